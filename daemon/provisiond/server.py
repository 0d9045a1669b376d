"""Config in, a running daemon out: startup and shutdown in one clear order.

Start: store (migrations) → features → start hooks → broker connection and
subscriptions → ready. Stop: refuse new requests → drain in-flight ones up to
the grace period → stop hooks (reverse order) → clean disconnect → store closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from provisiond import replay
from provisiond.app import App
from provisiond.clock import Clock
from provisiond.config import Config, resolve_path
from provisiond.errors import StoreUnavailable
from provisiond.features import FEATURES, Setup
from provisiond.logs import get_logger
from provisiond.rpc import Router
from provisiond.schema import all_migrations
from provisiond.store import Store
from provisiond.transport import Delivery, Subscription, Transport

log = get_logger("provisiond.server")

Notify = Callable[[str], None]


def _no_notify(_state: str) -> None:
    return None


class Server:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        notify: Notify = _no_notify,
        features: list[Setup] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.notify = notify
        self.features = FEATURES if features is None else features
        self.ready = asyncio.Event()
        self.app: App | None = None
        self.router: Router | None = None
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(
        self, shutdown_trigger: Callable[[], Coroutine[Any, Any, object]] | None = None
    ) -> None:
        store = Store(
            resolve_path(self.config, self.config.store.path),
            synchronous=self.config.store.synchronous,
        )
        self.notify("STATUS=opening store")
        applied = await store.open(all_migrations())
        if applied:
            log.info("store.migrated", applied=applied)
        transport = Transport(self.config)
        app = App(self.config, store, transport, self.clock)
        router = Router(app)
        self.app, self.router = app, router
        for setup in self.features:
            setup(app, router)
        started: list[Callable[[], Awaitable[None]]] = []
        conn_task: asyncio.Task[None] | None = None
        trigger_task: asyncio.Task[object] | None = None
        try:
            for hook in app.on_start:
                await hook()
            started = list(app.on_stop)
            app.spawn(self._prune_replays(app), name="prune-replays")
            rpc_filter = app.topic("rpc", "#")
            if self.config.mqtt.shared_group:
                rpc_filter = f"$share/{self.config.mqtt.shared_group}/{rpc_filter}"
            subs = [Subscription(rpc_filter, 1), *app.subscriptions()]
            self.notify(f"STATUS=connecting to {self.config.mqtt.host}:{self.config.mqtt.port}")
            conn_task = asyncio.create_task(transport.run(subs, self._dispatcher(app, router)))
            if shutdown_trigger is not None:
                trigger_task = asyncio.create_task(shutdown_trigger())
                trigger_task.add_done_callback(lambda _t: self._stop.set())
            await self._wait_ready(transport, conn_task)
            self.ready.set()
            log.info("daemon.ready", topic_prefix=app.prefix, operations=sorted(router.operations))
            self.notify("READY=1\nSTATUS=serving")
            await self._stop.wait()
        finally:
            self.notify("STOPPING=1\nSTATUS=draining")
            left = await router.drain(self.config.daemon.shutdown_grace_seconds)
            if left:
                log.warning("daemon.drain_timeout", unanswered=left)
            for hook in reversed(started):
                try:
                    await hook()
                except Exception:
                    log.exception(
                        "daemon.stop_hook_failed", hook=getattr(hook, "__qualname__", "?")
                    )
            await transport.stop()
            if conn_task is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(conn_task, timeout=5)
            if trigger_task is not None:
                trigger_task.cancel()
            await app.cancel_tasks()
            await store.close()
            log.info("daemon.stopped")

    async def _wait_ready(self, transport: Transport, conn_task: asyncio.Task[None]) -> None:
        subscribed = asyncio.create_task(transport.subscribed.wait())
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait(
            {subscribed, conn_task, stop}, return_when=asyncio.FIRST_COMPLETED
        )
        subscribed.cancel()
        stop.cancel()
        if conn_task in done:
            conn_task.result()  # surfaces a startup failure (e.g. bad TLS files)

    def _dispatcher(self, app: App, router: Router) -> Callable[[Delivery], Awaitable[None]]:
        rpc_prefix = router.rpc_prefix

        async def dispatch(delivery: Delivery) -> None:
            topic = delivery.topic
            if topic.startswith(rpc_prefix):
                await router.submit(delivery)
                return
            found = app.match(topic)
            if found is None:
                app.transport.ack(delivery)
                return
            route, values = found
            try:
                result = route.handler(delivery, values)
                if result is not None:
                    await result
            except Exception:
                app.counters["topics.handler_failed"] += 1
                log.exception("topic.handler_failed", topic=topic)
            app.transport.ack(delivery)

        return dispatch

    async def _prune_replays(self, app: App) -> None:
        while True:
            await asyncio.sleep(60)
            with contextlib.suppress(StoreUnavailable):
                await app.store.call(partial(replay.prune, now=app.clock.now()))
