"""Where an incoming message goes: RPC requests to the router, the rest by topic.

In the style of Home Assistant's mqtt integration: routes without wildcards
sit in a dict keyed by their topic, routes with `+`/`#` in a list, and the
match of a topic against that list is cached, since the same few thousand
device topics come back every heartbeat interval. A topic handler that fails
is logged and counted; it never stops the others, and the message is
acknowledged all the same (a message left unacknowledged would hold one of
the broker's in-flight slots for good).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from provisiond.logs import get_logger
from provisiond.transport import Delivery, Subscription

log = get_logger("provisiond.runtime.dispatch")

TopicHandler = Callable[[Delivery, list[str]], Awaitable[None] | None]
Submit = Callable[[Delivery], Awaitable[None]]

# Topic handlers that wait may run this many at once; more wait their turn.
TOPIC_HANDLER_TASKS: Final = 64
MATCH_CACHE_SIZE: Final = 8192


@dataclass(frozen=True)
class TopicRoute:
    """Messages on `P/<pattern>` go to `handler(delivery, wildcard_values)`."""

    pattern: tuple[str, ...]
    handler: TopicHandler
    qos: int


class Dispatcher:
    """Topic routes of the features, and the one entry point for every message."""

    def __init__(
        self, prefix: str, *, ack: Callable[[Delivery], None], counters: Counter[str]
    ) -> None:
        self._prefix = prefix
        self._prefix_parts = len(prefix.split("/"))
        self._ack = ack
        self._counters = counters
        self._exact: dict[str, TopicRoute] = {}
        self._wildcard: list[TopicRoute] = []
        self._cache: dict[str, tuple[TopicRoute, list[str]] | None] = {}
        self._rpc_prefix = f"{prefix}/rpc/"
        self._submit: Submit | None = None
        self._spawn: Callable[[Awaitable[None], str], None] | None = None
        # Handlers that wait (a store write for a command ack or a WiFi report)
        # run beside the message loop, so heartbeats never queue behind them.
        self._slots = asyncio.Semaphore(TOPIC_HANDLER_TASKS)
        self.last_delivery = 0.0

    # ---- routes

    def route(self, pattern: str, handler: TopicHandler, *, qos: int = 1) -> None:
        """Handle messages on `P/<pattern>`; `+` and `#` values are passed to the handler."""
        route = TopicRoute(tuple(pattern.split("/")), handler, qos)
        if "+" in route.pattern or "#" in route.pattern:
            self._wildcard.append(route)
        elif pattern in self._exact:
            raise ValueError(f"topic {pattern} routed twice")
        else:
            self._exact[pattern] = route
        self._cache.clear()

    @property
    def routes(self) -> list[TopicRoute]:
        return [*self._exact.values(), *self._wildcard]

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(f"{self._prefix}/{'/'.join(r.pattern)}", r.qos) for r in self.routes]

    def match(self, topic: str) -> tuple[TopicRoute, list[str]] | None:
        """The route for a full topic name and its wildcard values, or None."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        found = self._match(topic)
        if len(self._cache) >= MATCH_CACHE_SIZE:
            # Cleared rather than kept in LRU order: a fleet larger than the
            # cache would make every heartbeat pay for the bookkeeping.
            self._cache.clear()
        self._cache[topic] = found
        return found

    def _match(self, topic: str) -> tuple[TopicRoute, list[str]] | None:
        if not topic.startswith(self._prefix + "/"):
            return None
        rest = topic[len(self._prefix) + 1 :]
        exact = self._exact.get(rest)
        if exact is not None:
            return exact, []
        parts = topic.split("/")[self._prefix_parts :]
        for route in self._wildcard:
            values = _match(route.pattern, parts)
            if values is not None:
                return route, values
        return None

    # ---- delivery

    def serve_rpc(self, submit: Submit, spawn: Callable[[Awaitable[None], str], None]) -> None:
        """Requests on `P/rpc/...` go to `submit`; waiting topic handlers run via `spawn`."""
        self._submit = submit
        self._spawn = spawn

    async def dispatch(self, delivery: Delivery) -> None:
        """Hand one message to its owner; never raises."""
        await self.dispatch_from(delivery, self._ack)

    async def dispatch_from(self, delivery: Delivery, ack: Callable[[Delivery], None]) -> None:
        """`dispatch` for a message from another link, whose acks go back to it."""
        self.last_delivery = asyncio.get_running_loop().time()
        topic = delivery.topic
        if self._submit is not None and topic.startswith(self._rpc_prefix):
            await self._submit(delivery)
            return
        found = self.match(topic)
        if found is None:
            ack(delivery)
            return
        route, values = found
        try:
            pending = route.handler(delivery, values)
            if pending is not None and self._spawn is not None:
                await self._slots.acquire()
                self._spawn(self._finish(pending, delivery, ack), "topic-handler")
                return
            if pending is not None:
                await pending
        except Exception:
            self._failed(topic)
        ack(delivery)

    async def _finish(
        self, pending: Awaitable[None], delivery: Delivery, ack: Callable[[Delivery], None]
    ) -> None:
        try:
            await pending
        except Exception:
            self._failed(delivery.topic)
        finally:
            self._slots.release()
        ack(delivery)

    def _failed(self, topic: str) -> None:
        self._counters["topics.handler_failed"] += 1
        log.exception("topic.handler_failed", topic=topic)


def _match(pattern: tuple[str, ...], parts: list[str]) -> list[str] | None:
    values: list[str] = []
    for i, segment in enumerate(pattern):
        if segment == "#":
            values.append("/".join(parts[i:]))
            return values
        if i >= len(parts):
            return None
        if segment == "+":
            values.append(parts[i])
        elif segment != parts[i]:
            return None
    return values if len(parts) == len(pattern) else None
