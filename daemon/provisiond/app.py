"""The running daemon's shared parts, handed to every feature at setup.

A feature (provisioning, presence, a plugin...) gets an `App`, registers its
RPC operations and topic handlers, and may add start/stop hooks. It never
reaches into another feature; what it needs from one is passed explicitly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from provisiond.clock import Clock
from provisiond.config import Config
from provisiond.devices import DeviceCache
from provisiond.logs import get_logger
from provisiond.mqtt import PublishRefused
from provisiond.store import Store
from provisiond.transport import Delivery, NotConnected, Subscription, Transport

log = get_logger("provisiond.app")

TopicHandler = Callable[[Delivery, list[str]], Awaitable[None] | None]
Hook = Callable[[], Awaitable[None]]
# Called with the new config after SIGHUP swapped it in; raising refuses it (rolled back).
ReloadHook = Callable[[Config], Awaitable[None]]


@dataclass
class TopicRoute:
    """Messages on `P/<pattern>` go to `handler(delivery, wildcard_values)`."""

    pattern: list[str]
    handler: TopicHandler
    qos: int


@dataclass
class App:
    config: Config
    store: Store
    transport: Transport
    clock: Clock
    counters: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.time)
    routes: list[TopicRoute] = field(default_factory=list)
    on_start: list[Hook] = field(default_factory=list)
    on_stop: list[Hook] = field(default_factory=list)
    on_reload: list[ReloadHook] = field(default_factory=list)
    # Long-lived helpers features share (e.g. "presence", "grants"), set at setup.
    services: dict[str, Any] = field(default_factory=dict)
    devices: DeviceCache = field(default_factory=DeviceCache)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def prefix(self) -> str:
        return self.config.mqtt.topic_prefix

    def topic(self, *parts: str | int) -> str:
        return "/".join([self.prefix, *(str(p) for p in parts)])

    def route(self, pattern: str, handler: TopicHandler, *, qos: int = 1) -> None:
        """Handle messages on `P/<pattern>`; `+` segments are passed to the handler."""
        self.routes.append(TopicRoute(pattern.split("/"), handler, qos))

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.topic("/".join(r.pattern)), r.qos) for r in self.routes]

    def match(self, topic: str) -> tuple[TopicRoute, list[str]] | None:
        parts = topic.split("/")
        prefix = self.prefix.split("/")
        if parts[: len(prefix)] != prefix:
            return None
        parts = parts[len(prefix) :]
        for route in self.routes:
            values = _match(route.pattern, parts)
            if values is not None:
                return route, values
        return None

    def spawn(self, coro: Awaitable[None], *, name: str) -> None:
        """Run a background task whose failure is logged, never lost or fatal."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task.failed", task=name)

        task = asyncio.get_running_loop().create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def publish_event(self, name: str, payload: dict[str, Any]) -> None:
        """Publish on `P/events/<name>`; an event lost while the broker is down is only logged."""
        body = {"event": name, "at": self.clock.now(), **payload}
        try:
            await self.transport.publish(
                self.topic("events", name), json.dumps(body).encode(), qos=1
            )
            self.counters[f"events.{name}"] += 1
        except NotConnected:
            log.warning("event.dropped", event_name=name, reason="broker disconnected")
        except PublishRefused as exc:
            log.error("event.dropped", event_name=name, reason=str(exc))


def _match(pattern: list[str], parts: list[str]) -> list[str] | None:
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
