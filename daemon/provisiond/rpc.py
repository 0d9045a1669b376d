"""RPC over MQTT: parse a request, authenticate, dispatch, reply (docs/protocol.md §2).

This module is the one boundary where exceptions become reply codes. Each
request runs as its own task under a concurrency bound; a handler that fails
answers 500 with an error id that is in the log, and nothing else notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import sqlite_utils
from pydantic import BaseModel, ConfigDict, ValidationError

from provisiond import auth, replay
from provisiond.config import Config
from provisiond.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RpcError,
    Unauthorized,
    Unavailable,
)
from provisiond.logs import get_logger
from provisiond.payloads import NotJson, parse_json
from provisiond.runtime.app import App
from provisiond.runtime.fairslots import FairSlots
from provisiond.transport import Delivery, NotConnected, PublishRefused

log = get_logger("provisiond.rpc")

# Keys an MQTT 3.1.1 client puts in the body, since it has no properties.
V3_KEYS = ("reply_to", "correlation_id", "authorization")
MAX_CORRELATION_BYTES = 256
# Requests accepted beyond the concurrency bound, waiting for a slot.
MAX_WAITING = 1_000


class Body(BaseModel):
    """Base of every request body: strict types, unknown fields refused by name."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class EmptyBody(Body):
    pass


Handler = Callable[["Request", Any], Awaitable[dict[str, Any]]]


RequestObserver = Callable[[str, "int | str", float, dict[str, Any]], None]


class Reply(Protocol):
    """What a write transaction returns: its effect, and the reply body it makes."""

    def reply(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Reply)


@dataclass(frozen=True)
class Operation:
    name: str
    handler: Handler
    body: type[BaseModel] = EmptyBody
    # api_key: the router authenticates the `authorization` credential.
    # body_token: the body carries its own credential (`token`), e.g. device activation.
    auth: Literal["api_key", "body_token"] = "api_key"
    scope: str | None = None


@dataclass
class ReplyPath:
    topic: str
    correlation: bytes | None
    # MQTT 3.1.1 requesters get their correlation_id back in the body.
    correlation_id: Any = None
    v5: bool = True


@dataclass
class Request:
    """What a handler sees: the validated body, the caller, and a way to write."""

    app: App
    operation: str
    principal: auth.Principal | None
    log_fields: dict[str, Any] = field(default_factory=dict)
    _replay_id: str | None = None
    _replay_secret: str | None = None
    _replays: replay.Replays | None = None
    replay_saved: bool = False

    async def write(
        self, fn: Callable[[sqlite_utils.Database], R], *, pipelined: bool = False
    ) -> R:
        """Run `fn` in one transaction and return what it returns.

        The reply body `fn`'s result makes (`result.reply()`) is recorded for
        replays in the same transaction, so a crash can never leave the effect
        without the reply a redelivery must get. The handler then returns
        that same `result.reply()`, after whatever it does once committed.
        `pipelined`: see `Store.write` (`fn` may run more than once and reads
        its results through `store.check_later`).
        """
        rid, secret, now = self._replay_id, self._replay_secret, self.app.clock.now()

        def tx(db: sqlite_utils.Database) -> R:
            result = fn(db)
            if rid is not None and secret is not None:
                sealed = replay.seal(secret, rid, _envelope_ok(result.reply()))
                # A duplicate that finished first makes ours roll back and
                # answer as it did.
                replay.record(db, rid, sealed, now, duplicate=lambda: _DuplicateWon(rid))
            return result

        result = await self.app.store.write(tx, pipelined=pipelined)
        if rid is not None:
            self.replay_saved = True
            if self._replays is not None:
                self._replays.saved(rid)
        return result


class _Unbound(Exception):
    """With `daemon.reply_topics = "per-key"`: the reply topic is not the key's own."""


class _DuplicateWon(Exception):
    def __init__(self, rid: str) -> None:
        super().__init__(rid)
        self.rid = rid


def _envelope_ok(body: dict[str, Any]) -> bytes:
    return json.dumps({"status": 200, "body": body}, separators=(",", ":")).encode()


class Router:
    def __init__(self, app: App) -> None:
        self.app = app
        self.operations: dict[str, Operation] = {}
        self.draining = False
        self._slots = FairSlots(
            app.config.daemon.max_concurrent_requests, app.config.limits.max_inflight_per_key
        )
        self._admit = asyncio.Semaphore(app.config.daemon.max_concurrent_requests + MAX_WAITING)
        self._inflight: set[asyncio.Task[None]] = set()
        # Requests already accepted when the drain began: finished, never refused.
        self._accepted_before_drain: set[asyncio.Task[None]] = set()
        self._buckets: dict[str, tuple[float, float]] = {}
        self.replays = replay.Replays(app.store, app.clock)
        self.keys = app.caches.keys
        self.rpc_prefix = app.topic("rpc") + "/"
        # Told of every finished request (operation, status, seconds, log fields).
        self.on_finished: RequestObserver | None = None
        app.on_reload.append(self._reload)

    async def _reload(self, config: Config) -> None:
        self._slots.configure(config.limits.max_inflight_per_key)

    async def start(self) -> None:
        """Load the recent replay ids and start their upkeep."""
        await self.replays.start()
        self.app.spawn(self.replays.run(), name="replays")

    def register(self, op: Operation, *, replace: bool = False) -> None:
        """Serve `op`; `replace` lets a plugin swap in its own handler again."""
        if op.name in self.operations and not replace:
            raise ValueError(f"operation {op.name} is already registered")
        self.operations[op.name] = op

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def submit(self, delivery: Delivery) -> None:
        """Start handling a request without holding up the message loop.

        At most `max_concurrent_requests` run; the rest wait in their tasks, so
        heartbeats keep flowing while slow operations (a BLE upload) fill the
        slots. Only a backlog far beyond that makes the loop itself wait.
        """
        await self._admit.acquire()
        task = asyncio.get_running_loop().create_task(self._queued(delivery))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    async def _queued(self, delivery: Delivery) -> None:
        await self._handle(delivery)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._admit.release()

    async def drain(self, grace: float) -> int:
        """Refuse new requests and wait up to `grace` for those in flight; returns how many remain."""
        if not self.draining:
            self.draining = True
            self._accepted_before_drain = set(self._inflight)
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)
        return len(self._inflight)

    # --- one request

    async def _handle(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        name = delivery.topic[len(self.rpc_prefix) :]
        fields: dict[str, Any] = {"op": name}
        status: int | str = 500
        try:
            path, reply, status = await self._in_turn(delivery, name, fields)
            if path is None:
                status = "dropped"  # nothing was answered; not a server error
                self.app.counters["rpc.dropped"] += 1
                log.warning("rpc.dropped", reason="no reply path", **fields)
                self.app.transport.ack(delivery)
                return
            if path.topic:
                await self._publish(path, reply, delivery)
            else:
                self.app.transport.ack(delivery)
        except _Unbound:
            # Answering would publish on a topic the caller may not own.
            status = "dropped"
            self.app.counters["rpc.dropped"] += 1
            log.warning("rpc.dropped", reason="reply topic is not the key's own", **fields)
            self.app.transport.ack(delivery)
        except NotConnected:
            # Unacked, so the broker redelivers it and the replay record answers it.
            fields["reply"] = "lost; left unacknowledged for redelivery"
        except PublishRefused as exc:
            # Refused again if redelivered, so the request is acknowledged (if the
            # reply was written, its ack went with it; else it goes now).
            fields["reply"] = f"refused by the broker (0x{exc.reason_code:02x})"
            self.app.transport.ack(delivery)
        except Exception:  # a bug in the router itself; never let it kill the loop
            log.exception("rpc.router_failed", **fields)
            # Acknowledged all the same: a message left unacknowledged holds one
            # of the broker's in-flight slots for good, and enough of them would
            # stop all delivery to the daemon.
            self.app.transport.ack(delivery)
        finally:
            self.app.counters[f"rpc.status.{status}"] += 1
            self.app.counters["rpc.requests"] += 1
            fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
            log.info("rpc", status=status, **fields)
            if self.on_finished is not None:
                self.on_finished(name, status, time.perf_counter() - started, fields)

    async def _in_turn(
        self, delivery: Delivery, name: str, fields: dict[str, Any]
    ) -> tuple[ReplyPath | None, bytes, int | str]:
        """Parse and answer in the caller's turn for a slot; a None path: nowhere to reply."""
        caller = _presented_key(delivery)
        async with contextlib.AsyncExitStack() as turn:
            if caller is not None:
                # The key is a property: the turn comes before any parsing, so a
                # flood's waiting requests cost nothing until theirs comes.
                await turn.enter_async_context(self._slots.slot(caller))
            path, body = self._parse(delivery, fields)
            if path is None:
                return None, b"", "dropped"
            if caller is None:
                await turn.enter_async_context(self._slots.slot(_caller(body)))
            reply, status = await self._reply_for(name, body, path, fields)
        return path, reply, status

    def _parse(self, delivery: Delivery, fields: dict[str, Any]) -> tuple[ReplyPath | None, Any]:
        """Find the reply path and the body; errors are returned as the body."""
        message = delivery
        payload = message.payload
        path: ReplyPath | None = None
        user_auth: str | None = None
        if message.response_topic:
            path = ReplyPath(message.response_topic, message.correlation_data)
            user_auth = _presented_key(message)
            # Vetted before anything is answered on it: even an error reply must
            # never go to a wildcard topic or pose as a device's heartbeat.
            if self._refuse_reply_topic(path, fields):
                return None, None
            if path.correlation is not None and len(path.correlation) > MAX_CORRELATION_BYTES:
                return path, BadRequest("correlation data is too long", field="correlation_id")
        if len(payload) > self.app.config.daemon.max_payload_bytes:
            fields["bytes"] = len(payload)
            return path, PayloadTooLarge(
                f"payload is {len(payload)} bytes; the limit is {self.app.config.daemon.max_payload_bytes}"
            )
        try:
            body = parse_json(payload) if payload.strip() else {}
        except NotJson as exc:
            return path, BadRequest(f"body is not valid JSON: {exc}", code="invalid_json")
        if isinstance(body, dict) and path is None and isinstance(body.get("reply_to"), str):
            corr_id = body.get("correlation_id")
            path = ReplyPath(
                body["reply_to"],
                None if corr_id is None else str(corr_id).encode(),
                correlation_id=corr_id,
                v5=False,
            )
            if self._refuse_reply_topic(path, fields):
                return None, None
            if path.correlation is not None and len(path.correlation) > MAX_CORRELATION_BYTES:
                return path, BadRequest("correlation data is too long", field="correlation_id")
        if isinstance(body, dict):
            if user_auth is None and isinstance(body.get("authorization"), str):
                user_auth = body["authorization"]
            for key in V3_KEYS:
                body.pop(key, None)
        if not isinstance(body, dict):
            return path, BadRequest("body must be a JSON object", code="invalid_body")
        return path, (user_auth, body)

    def _refuse_reply_topic(self, path: ReplyPath, fields: dict[str, Any]) -> bool:
        problem = self._check_reply_topic(path.topic)
        if problem:
            fields["reply_topic_refused"] = problem
        return problem is not None

    def _check_reply_topic(self, topic: str) -> str | None:
        if not topic or "+" in topic or "#" in topic or len(topic) > 512:
            return "reply topic must be a non-empty topic name without wildcards"
        if topic.startswith("$") or _FORBIDDEN_IN_TOPICS.search(topic):
            # The broker disconnects a client that publishes there; the
            # request would then be redelivered, and refused again, forever.
            return "reply topic must not start with $ or hold control characters or non-characters"
        # Replies must never be aimed at the daemon's own channels, where a
        # forged reply could pass for a command, an event or presence.
        prefix = self.app.prefix + "/"
        if topic.startswith(prefix):
            rest = topic[len(prefix) :].split("/")
            allowed = rest[0] == "replies" or (
                len(rest) >= 3 and rest[0] == "devices" and rest[2] == "replies"
            )
            if not allowed:
                return "reply topic inside the daemon's namespace must be under replies/"
        return None

    async def _reply_for(
        self, name: str, parsed: Any, path: ReplyPath, fields: dict[str, Any]
    ) -> tuple[bytes, int]:
        try:
            if isinstance(parsed, RpcError):
                raise parsed
            user_auth, body = parsed
            return await self._dispatch(name, user_auth, body, path, fields), 200
        except _Unbound:
            raise
        except RpcError as exc:
            fields["error"] = exc.code
            if exc.field:
                fields["field"] = exc.field
            return _envelope_error(exc.status, exc.error_body()), exc.status
        except Exception:
            error_id = "err_" + secrets.token_hex(6)
            fields["error_id"] = error_id
            log.exception("rpc.internal_error", error_id=error_id, op=name)
            return _envelope_error(
                500,
                {
                    "code": "internal",
                    "message": f"internal error; reference {error_id}",
                    "error_id": error_id,
                },
            ), 500

    async def _dispatch(
        self,
        name: str,
        user_auth: str | None,
        body: dict[str, Any],
        path: ReplyPath,
        fields: dict[str, Any],
    ) -> bytes:
        op = self.operations.get(name)
        if op is None:
            raise NotFound(f"unknown operation {name!r}", code="unknown_operation")
        if self.draining and asyncio.current_task() not in self._accepted_before_drain:
            raise Unavailable("daemon is shutting down", code="shutting_down")
        if op.auth == "api_key":
            principal, secret, rid, stored = await self._bound_authenticate(
                op, user_auth, path, fields
            )
        else:
            principal = None
            token = body.get("token")
            secret = token if isinstance(token, str) else ""
            rid = (
                replay.replay_id("token:" + auth.hash_secret(secret), name, path.correlation)
                if path.correlation and secret
                else None
            )
            stored = None if rid is None else await self.replays.load(rid)
        if rid is None:
            return await self._run_handler(op, principal, body, None, secret, fields)
        return await self._once(op, principal, body, rid, secret, stored, fields)

    async def _bound_authenticate(
        self, op: Operation, user_auth: str | None, path: ReplyPath, fields: dict[str, Any]
    ) -> tuple[auth.Principal, str, str | None, bytes | None]:
        """`_authenticate`; with per-key reply topics, an unknown key gets no reply at all."""
        try:
            return await self._authenticate(op, user_auth, path, fields)
        except Unauthorized:
            if self.app.config.daemon.reply_topics == "per-key":
                raise _Unbound() from None
            raise

    async def _authenticate(
        self, op: Operation, user_auth: str | None, path: ReplyPath, fields: dict[str, Any]
    ) -> tuple[auth.Principal, str, str | None, bytes | None]:
        """The caller's key (cached, or with its stored reply in one store trip)."""
        secret = auth.parse_bearer(user_auth)
        corr = path.correlation
        cached = self.keys.get(secret)
        if cached is not None:
            key = cached
            rid = replay.replay_id(key.key_id, op.name, corr) if corr else None
            stored = None if rid is None else await self.replays.load(rid)
        else:
            now = self.app.clock.now()
            key, rid, stored = await self.app.store.call(
                lambda db: _key_prelude(db, secret, op.name, corr, now, self.replays)
            )
            self.keys.put(secret, key)
        fields["key_id"] = key.key_id
        if self.app.config.daemon.reply_topics == "per-key" and not path.topic.startswith(
            f"{self.app.prefix}/replies/{key.key_id}/"
        ):
            raise _Unbound()
        self._rate_limit(key.key_id)
        if op.scope is not None and op.scope not in key.scopes:
            raise Forbidden(f"key lacks scope {op.scope}", code="missing_scope")
        return key, secret, rid, stored

    async def _once(
        self,
        op: Operation,
        principal: auth.Principal | None,
        body: dict[str, Any],
        rid: str,
        secret: str,
        stored: bytes | None,
        fields: dict[str, Any],
    ) -> bytes:
        """Run a request that carries correlation data at most once in the replay window."""
        if stored is None:
            stored = self.replays.buffer.get(rid)
        reply = replay.unseal(secret, rid, stored) if stored is not None else None
        if reply is not None:
            fields["replay"] = True
            return reply
        running = self.replays.running(rid)
        if running is not None:
            # The same request is being handled right now (a redelivery racing
            # the original); answer with its result instead of doing it twice.
            fields["replay"] = True
            return await asyncio.shield(running)
        self.replays.begin(rid)
        try:
            reply = await self._run_handler(op, principal, body, rid, secret, fields)
        except _DuplicateWon:
            # Recorded by a duplicate, perhaps in another process: ask the store.
            sealed = await self.replays.load(rid, anywhere=True)
            reply = None if sealed is None else replay.unseal(secret, rid, sealed)
            if reply is None:
                exc = Unavailable("duplicate request raced; retry")
                self.replays.finish(rid, exc=exc)
                raise exc from None
            fields["replay"] = True
        except BaseException as exc:
            self.replays.finish(rid, exc=exc)
            raise
        # A third copy may be waiting on this one: it gets the same answer.
        self.replays.finish(rid, reply)
        return reply

    async def _run_handler(
        self,
        op: Operation,
        principal: auth.Principal | None,
        body: dict[str, Any],
        rid: str | None,
        secret: str,
        fields: dict[str, Any],
    ) -> bytes:
        try:
            parsed = op.body.model_validate(body)
        except ValidationError as exc:
            raise _bad_body(exc) from None
        request = Request(
            self.app, op.name, principal, fields, rid, secret if rid else None, self.replays
        )
        result = await op.handler(request, parsed)
        reply = _envelope_ok(result)
        if rid is not None and not request.replay_saved:
            # The handler changed nothing in the store: its reply is saved in a batch.
            self.replays.save_later(rid, secret, reply)
        return reply

    def _rate_limit(self, key_id: str) -> None:
        limits = self.app.config.limits
        if limits.rate_per_key <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (float(limits.burst_per_key), now))
        tokens = min(float(limits.burst_per_key), tokens + (now - last) * limits.rate_per_key)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            raise RateLimited("too many requests for this key")
        self._buckets[key_id] = (tokens - 1, now)

    async def _publish(self, path: ReplyPath, reply: bytes, request: Delivery) -> None:
        """Publish the reply and acknowledge the request with it, in one write."""
        correlation: bytes | None = None
        if path.v5:
            correlation = path.correlation
        else:
            envelope = json.loads(reply)
            envelope["correlation_id"] = path.correlation_id
            reply = json.dumps(envelope, separators=(",", ":")).encode()
        await self.app.transport.publish(
            path.topic, reply, qos=1, correlation_data=correlation, ack=request
        )


# MQTT 5 §1.5.4: no U+0000, and the broker may refuse (mosquitto does, by
# disconnecting) control characters and non-characters; surrogates cannot be
# encoded at all.
_FORBIDDEN_IN_TOPICS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)


def _key_prelude(
    db: sqlite_utils.Database,
    secret: str,
    operation: str,
    correlation: bytes | None,
    now: float,
    replays: replay.Replays,
) -> tuple[auth.Principal, str | None, bytes | None]:
    principal = auth.lookup_key(db, secret)
    if not correlation:
        return principal, None, None
    rid = replay.replay_id(principal.key_id, operation, correlation)
    return principal, rid, replay.load(db, rid, now) if replays.may_exist(rid) else None


def _presented_key(delivery: Delivery) -> str | None:
    """An MQTT v5 request's `authorization` property, found without parsing its body."""
    if not delivery.response_topic:
        return None
    found: str | None = None
    for key, value in delivery.user_properties:
        if key.lower() == "authorization":
            found = value  # the last one, if a client sent several
    return found


def _caller(parsed: Any) -> str:
    """Whom a request's slot is charged to: its credential as presented, else one group."""
    if isinstance(parsed, tuple) and isinstance(parsed[0], str):
        return parsed[0]
    return ""


def _envelope_error(status: int, error: dict[str, Any]) -> bytes:
    return json.dumps({"status": status, "error": error}, separators=(",", ":")).encode()


def _bad_body(exc: ValidationError) -> BadRequest:
    first = exc.errors(include_url=False, include_input=False)[0]
    field_name = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return BadRequest(f"unknown field {field_name!r}", code="unknown_field", field=field_name)
    if first["type"] == "missing":
        return BadRequest(f"{field_name} is required", code="missing_field", field=field_name)
    return BadRequest(f"{field_name}: {first['msg']}", code="invalid_field", field=field_name)
