"""Helpers for the presence and command tests: seeded devices, a fake device, a topic watcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import aiomqtt

from provisiond import auth
from provisiond.config import Config
from support import open_db


def seed_devices(
    config: Config,
    ids: Iterable[int],
    *,
    org: int = 1,
    owner: int = 1,
    state: str = "active",
) -> None:
    """Insert devices straight into the store (activated unless `state` says otherwise)."""
    db = open_db(config)
    if not db.execute("SELECT 1 FROM orgs WHERE id = ?", [org]).fetchone():
        auth.create_org(db, org, f"org {org}")
    if not db.execute("SELECT 1 FROM users WHERE id = ?", [owner]).fetchone():
        auth.create_user(db, org, owner)
    now = time.time()
    active = state == "active"
    db.conn.executemany(
        "INSERT INTO devices (id, org_id, owner_id, state, capabilities, public_key, created_at,"
        " activated_at) VALUES (?, ?, ?, ?, 2, ?, ?, ?)",
        [
            (i, org, owner, state, b"k" * 32 if active else None, now, now if active else None)
            for i in ids
        ],
    )
    db.conn.close()


def _client(config: Config, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        config.mqtt.port,
        identifier=f"t-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        **kwargs,
    )


class Received:
    """Messages seen on subscribed topics, with their arrival time (monotonic)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, float]] = []
        self._changed = asyncio.Event()

    def add(self, topic: str, payload: bytes) -> None:
        try:
            body: Any = json.loads(payload)
        except ValueError:
            body = payload.decode(errors="replace")
        self.items.append((topic, body, time.monotonic()))
        self._changed.set()

    def on(self, suffix: str) -> list[tuple[Any, float]]:
        return [(body, at) for topic, body, at in self.items if topic.endswith(suffix)]

    async def wait_for(
        self, suffix: str, check: Callable[[Any], bool] = lambda _b: True, timeout: float = 5.0
    ) -> tuple[Any, float]:
        """The first message on a topic ending with `suffix` that passes `check`."""
        deadline = time.monotonic() + timeout
        while True:
            for body, at in self.on(suffix):
                if check(body):
                    return body, at
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message on *{suffix} matching within {timeout}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


class _Listener:
    """An MQTT client that records every message on its subscriptions in `got`."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.got = Received()
        self._reader: asyncio.Task[None] | None = None
        self._killed = False

    async def _connect(self, topics: list[str]) -> None:
        await self.client.__aenter__()
        for topic in topics:
            await self.client.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.client.messages:
            self.got.add(message.topic.value, bytes(message.payload))  # type: ignore[arg-type]

    async def __aexit__(self, *exc: object) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if not self._killed:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.__aexit__(None, None, None)


class Watcher(_Listener):
    """A subscriber to daemon outputs: presence, events, commands."""

    def __init__(self, config: Config, topics: list[str]) -> None:
        super().__init__(_client(config))
        self.config = config
        self.topics = topics

    async def __aenter__(self) -> Watcher:
        prefix = self.config.mqtt.topic_prefix
        await self._connect([f"{prefix}/{topic}" for topic in self.topics])
        return self


class FakeDevice(_Listener):
    """A device: heartbeats, status with a last will, receives commands and acks them."""

    def __init__(self, config: Config, device_id: int, *, will: bool = True) -> None:
        self.prefix = f"{config.mqtt.topic_prefix}/devices/{device_id}"
        self.device_id = device_id
        will_msg = (
            aiomqtt.Will(f"{self.prefix}/status", b"offline", qos=1, retain=True) if will else None
        )
        super().__init__(_client(config, will=will_msg, keepalive=5))

    async def __aenter__(self) -> FakeDevice:
        await self._connect([f"{self.prefix}/commands/reconfigure"])
        return self

    @property
    def commands(self) -> list[Any]:
        return [body for body, _at in self.got.on("/commands/reconfigure")]

    async def heartbeat(self, payload: dict[str, Any] | bytes | None = None) -> float:
        """Publish one heartbeat; returns when it was sent (monotonic)."""
        raw = payload if isinstance(payload, bytes) else json.dumps(payload or {}).encode()
        sent = time.monotonic()
        await self.client.publish(f"{self.prefix}/heartbeat", raw, qos=0)
        return sent

    async def status(self, text: str) -> None:
        await self.client.publish(f"{self.prefix}/status", text.encode(), qos=1, retain=True)

    async def ack(self, command_id: str, result: Any = "ok") -> None:
        body = json.dumps({"id": command_id, "result": result}).encode()
        await self.client.publish(f"{self.prefix}/commands/ack", body, qos=1)

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT, so the broker publishes the will."""
        self._killed = True
        if self._reader:
            self._reader.cancel()
        sock = self.client._client.socket()
        assert sock is not None
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
