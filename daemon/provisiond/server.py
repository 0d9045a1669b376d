"""Config in, a running daemon out: startup and shutdown in one clear order.

Start: store (migrations) → features → start hooks → broker connection and
subscriptions → ready. Stop: refuse new requests → drain in-flight ones up to
the grace period → stop hooks (reverse order) → clean disconnect → store closed.
Reload (SIGHUP): swap in a new config, except keys only a restart can change.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

from provisiond import plugins as plugin_api
from provisiond.clock import Clock
from provisiond.config import Config, LogConfig
from provisiond.errors import ConfigError, StoreUnavailable
from provisiond.logs import get_logger
from provisiond.reload import changed_keys, keep_restart_only
from provisiond.rpc import Router
from provisiond.runtime import priority
from provisiond.runtime.app import App, ReloadHook
from provisiond.runtime.features import FEATURES, Feature, set_up
from provisiond.schema import all_migrations
from provisiond.store import Store, store_target
from provisiond.transport import Subscription, Transport

log = get_logger("provisiond.server")

Notify = Callable[[str], None]

# While draining, the broker may still be handing us requests (they get a quick
# 503); wait until none arrived for this long before disconnecting, so their
# replies go out rather than being cut off.
DRAIN_SETTLE_SECONDS = 0.1
STATUS_POLL_SECONDS = 1.0


def _no_notify(_state: str) -> None:
    return None


class Server:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        notify: Notify = _no_notify,
        features: list[Feature] | None = None,
        watchdog_interval: float | None = None,
        setup_logging: Callable[[LogConfig], None] | None = None,
        plugins: Mapping[str, Any] | None = None,
        freeze_heap: bool = False,
    ) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.notify = notify
        self.features = FEATURES if features is None else features
        self.watchdog_interval = watchdog_interval
        # Only the real process reconfigures logging; in-process tests keep their capture.
        self.setup_logging = setup_logging
        # name -> plugin class; None: the installed entry points (plugins.discover).
        self.plugins = plugins
        # Only the real process: freezing is for the whole interpreter, and an
        # in-process test would freeze the test runner's heap with it.
        self.freeze_heap = freeze_heap
        self.supervisor: plugin_api.PluginSupervisor | None = None
        self.ready = asyncio.Event()
        self.app: App | None = None
        self.router: Router | None = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()
        self._started: list[Callable[[], Awaitable[None]]] = []
        self._conn_task: asyncio.Task[None] | None = None
        # With `[mqtt] shared_group`: the link that receives the device topics.
        self.devices_link: Transport | None = None
        self._link_task: asyncio.Task[None] | None = None

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self, load: Callable[[], Config]) -> None:
        """Reload from `load()` in the background (a signal handler cannot await)."""
        task = asyncio.get_running_loop().create_task(self.reload_from(load))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload_from(self, load: Callable[[], Config]) -> bool:
        """Read the config again and apply it; a file that does not load is refused."""
        try:
            new = await asyncio.to_thread(load)
        except ConfigError as exc:
            log.error("config.reload_refused", error=str(exc), kept="previous config")
            self.notify("STATUS=serving; config reload refused, see the log")
            return False
        return await self.reload(new)

    async def reload(self, new_config: Config) -> bool:
        """Swap in `new_config`, keeping restart-only keys; returns whether it was applied.

        Features read `app.config` at use time; those holding derived state
        refresh it in an `app.on_reload` hook. A hook that raises refuses the
        config, and everything is put back as it was.
        """
        async with self._reload_lock:
            try:
                # Plugin tables are only dicts to Config; their own schemas judge them.
                specs = await asyncio.to_thread(plugin_api.resolve, new_config, self.plugins)
            except ConfigError as exc:
                log.error("config.reload_refused", error=str(exc), kept="previous config")
                self.notify("STATUS=serving; config reload refused, see the log")
                return False
            old = self.config
            new, pinned = keep_restart_only(old, new_config)
            if pinned:
                log.warning("config.needs_restart", keys=pinned, kept="running values")
            self.notify(
                f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading config"
            )
            applied: list[ReloadHook] = []
            try:
                self._apply(new)
                for hook in list(self.app.on_reload) if self.app else []:
                    await hook(new)
                    applied.append(hook)
            except Exception:
                log.exception("config.reload_refused", kept="previous config")
                self._apply(old)
                for hook in applied:
                    try:
                        await hook(old)
                    except Exception:
                        log.exception(
                            "config.rollback_failed", hook=getattr(hook, "__qualname__", "?")
                        )
                self.notify("READY=1\nSTATUS=serving; config reload refused, see the log")
                return False
            if self.supervisor is not None:
                restarted, pinned_plugins = await self.supervisor.reconfigure(specs)
                if restarted:
                    log.info("plugins.reconfigured", plugins=restarted)
                if pinned_plugins:
                    log.warning(
                        "config.needs_restart",
                        keys=[f"plugins.{name}" for name in pinned_plugins],
                        kept="running plugins",
                    )
            log.info("config.reloaded", changed=changed_keys(old, new))
            self.notify("READY=1\nSTATUS=serving")
            return True

    def _apply(self, config: Config) -> None:
        logging_changed = config.log != self.config.log
        self.config = config
        if self.app is not None:
            self.app.config = config
            self.app.transport.reconfigure(config)
        if logging_changed and self.setup_logging is not None:
            self.setup_logging(config.log)

    async def serve(
        self, shutdown_trigger: Callable[[], Coroutine[Any, Any, object]] | None = None
    ) -> None:
        """Start, serve until asked to stop (or `shutdown_trigger` returns), then stop."""
        watchdog: asyncio.Task[None] | None = None
        if self.watchdog_interval:
            watchdog = asyncio.create_task(self._watchdog(self.watchdog_interval))
        trigger_task: asyncio.Task[object] | None = None
        try:
            app, router = await self.startup()
        except BaseException:
            if watchdog is not None:
                watchdog.cancel()
            raise
        try:
            if shutdown_trigger is not None:
                trigger_task = asyncio.create_task(shutdown_trigger())
                trigger_task.add_done_callback(lambda _t: self._stop.set())
            await self.main_loop(app, router)
        finally:
            if trigger_task is not None:
                trigger_task.cancel()
            await self.shutdown(app, router)
            if watchdog is not None:
                watchdog.cancel()

    async def startup(self) -> tuple[App, Router]:
        """Open the store (migrations) and set the features up; nothing runs yet."""
        # Before anything opens: a bad [plugins.*] table is a config error (exit 3).
        self._plugin_specs = plugin_api.resolve(self.config, self.plugins)
        target, password = store_target(self.config)
        store = Store(
            target,
            synchronous=self.config.store.synchronous,
            group_commit=self.config.store.group_commit,
            password=password,
            on_thread_start=self._store_thread_started,
        )
        self.notify("STATUS=opening store")
        applied = await store.open(all_migrations())
        if applied:
            log.info("store.migrated", applied=applied)
        app = App(self.config, store, Transport(self.config), self.clock)
        app.stats_probes["store"] = store.probe
        router = Router(app)
        self.app, self.router = app, router
        try:
            set_up(self.features, app, router)
        except BaseException:
            await store.close()
            raise
        return app, router

    def _store_thread_started(self) -> None:
        """Runs on the store's thread, once, before its first call."""
        problem = priority.lower_current_thread(self.config.store.thread_priority)
        if problem is not None:
            log.warning("store.thread_priority", problem=problem)

    async def main_loop(self, app: App, router: Router) -> None:
        """Start hooks, plugins and the broker connection; serve until stopped."""
        for hook in app.on_start:
            await hook()
        self._started = list(app.on_stop)
        # Plugins run on top of the core: started after it, stopped before it.
        self.supervisor = plugin_api.PluginSupervisor(app, router, self._plugin_specs)
        self._started.append(self.supervisor.stop)
        await self.supervisor.start()
        await app.caches.start()
        app.spawn(app.caches.run(), name="watch-store")
        await router.start()
        app.topics.serve_rpc(router.submit, lambda coro, name: app.spawn(coro, name=name))
        self.notify(f"STATUS=connecting to {self.config.mqtt.host}:{self.config.mqtt.port}")
        conn_task = self._connect(app)
        await self._wait_ready(app.transport, conn_task)
        if self.devices_link is not None and self._link_task is not None:
            await self._wait_ready(self.devices_link, self._link_task)
        # What startup built (modules, models, schemas) lives as long as the
        # process: freezing it keeps the collector's full passes, which stop
        # the loop, down to what requests allocate (tens of ms less at p99).
        if self.freeze_heap:
            gc.collect()
            gc.freeze()
        self.ready.set()
        log.info("daemon.ready", topic_prefix=app.prefix, operations=sorted(router.operations))
        self.notify("READY=1\nSTATUS=serving")
        app.spawn(self._report_connection(app.transport), name="status-report")
        await self._until_stop(conn_task)

    def _connect(self, app: App) -> asyncio.Task[None]:
        """Start the broker link(s): one, or with `shared_group` a second for device topics.

        Each request and each device message then reaches one daemon of the
        group. Device topics get a link of their own because the main link's
        session outlives a dead daemon (its requests must wait for it), while a
        heartbeat handed to a dead daemon's session would be lost.
        """
        group = self.config.mqtt.shared_group
        rpc = Subscription(app.topic("rpc", "#"), 1)
        device_subs = app.topics.subscriptions()
        if group:
            rpc = Subscription(f"$share/{group}/{rpc.topic}", 1)
            link = self.devices_link = Transport(self.config, link="devices")
            shared = [replace(s, topic=f"$share/{group}/{s.topic}") for s in device_subs]
            self._link_task = asyncio.create_task(
                link.run(shared, lambda d: app.topics.dispatch_from(d, link.ack))
            )
            device_subs = []
        conn_task = asyncio.create_task(app.transport.run([rpc, *device_subs], app.topics.dispatch))
        self._conn_task = conn_task
        return conn_task

    async def shutdown(self, app: App, router: Router) -> None:
        """Drain, stop hooks in reverse, disconnect cleanly, close the store."""
        self.notify("STOPPING=1\nSTATUS=draining in-flight requests")
        left = await self._drain(router, app.config.daemon.shutdown_grace_seconds)
        if left:
            log.warning("daemon.drain_timeout", unanswered=left)
        self.notify("STATUS=flushing and disconnecting")
        for hook in reversed(self._started):
            try:
                await hook()
            except Exception:
                log.exception("daemon.stop_hook_failed", hook=getattr(hook, "__qualname__", "?"))
        if self.devices_link is not None:
            await self.devices_link.stop()
        await app.transport.stop()
        if self._conn_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._conn_task, timeout=5)
        if self._link_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._link_task, timeout=5)
        await app.cancel_tasks()
        with contextlib.suppress(StoreUnavailable):
            await router.replays.flush()
        await app.store.close()
        log.info("daemon.stopped")

    async def _until_stop(self, conn_task: asyncio.Task[None]) -> None:
        # The connection task ends by itself only on a bug: exit non-zero then,
        # so systemd restarts us instead of keeping a daemon that hears nothing.
        stop = asyncio.create_task(self._stop.wait())
        links = {conn_task} if self._link_task is None else {conn_task, self._link_task}
        await asyncio.wait({stop, *links}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in links:
            if task.done() and not self._stop.is_set():
                task.result()
                raise RuntimeError("the broker connection task ended unexpectedly")

    async def _drain(self, router: Router, grace: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            left = await router.drain(max(0.0, deadline - loop.time()))
            if loop.time() >= deadline:
                return left
            if left:
                continue  # more arrived while we waited; they are quick 503s
            quiet = loop.time() - (self.app.topics.last_delivery if self.app else 0.0)
            if quiet >= DRAIN_SETTLE_SECONDS:
                return 0
            await asyncio.sleep(min(DRAIN_SETTLE_SECONDS - quiet, deadline - loop.time()))

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a loop that stops turning stops the
        # pings, and systemd restarts the service (WatchdogSec=).
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _report_connection(self, transport: Transport) -> None:
        connected = True
        while True:
            await asyncio.sleep(STATUS_POLL_SECONDS)
            if transport.is_connected != connected:
                connected = transport.is_connected
                mqtt = self.config.mqtt
                self.notify(
                    "STATUS=serving"
                    if connected
                    else f"STATUS=broker {mqtt.host}:{mqtt.port} unreachable; reconnecting"
                )

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
