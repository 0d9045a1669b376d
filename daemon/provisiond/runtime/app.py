"""The running daemon's shared parts, handed to every feature at setup.

A feature (provisioning, presence, a plugin...) gets an `App`, registers its
RPC operations and topic handlers, and may add start/stop hooks. What it
takes from another feature comes through `app.services`, under a typed key
that the feature declares in `provisiond.runtime.features` (checked at start).
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
from provisiond.logs import get_logger
from provisiond.runtime.caches import StoreCaches
from provisiond.runtime.dispatch import Dispatcher, TopicHandler
from provisiond.runtime.services import Services
from provisiond.store import Store
from provisiond.transport import NotConnected, PublishRefused, Transport

log = get_logger("provisiond.runtime.app")

Hook = Callable[[], Awaitable[None]]
# Called with the new config after SIGHUP swapped it in; raising refuses it (rolled back).
ReloadHook = Callable[[Config], Awaitable[None]]
# A part of the `daemon/stats` reply, asked for when an operator asks.
StatsProbe = Callable[[], Awaitable[dict[str, Any]]]


@dataclass
class App:
    config: Config
    store: Store
    transport: Transport
    clock: Clock
    counters: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.time)
    on_start: list[Hook] = field(default_factory=list)
    on_stop: list[Hook] = field(default_factory=list)
    on_reload: list[ReloadHook] = field(default_factory=list)
    services: Services = field(default_factory=Services)
    stats_probes: dict[str, StatsProbe] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.caches = StoreCaches(self.store)
        self.topics = Dispatcher(self.prefix, ack=self.transport.ack, counters=self.counters)

    @property
    def prefix(self) -> str:
        return self.config.mqtt.topic_prefix

    def topic(self, *parts: str | int) -> str:
        return "/".join([self.prefix, *(str(p) for p in parts)])

    def route(self, pattern: str, handler: TopicHandler, *, qos: int = 1) -> None:
        """Handle messages on `P/<pattern>`; `+` segments are passed to the handler."""
        self.topics.route(pattern, handler, qos=qos)

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
