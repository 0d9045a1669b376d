"""Plugins: discovered through entry points, enabled by config, supervised.

A plugin is a class registered in the entry-point group `provisiond.plugins`
and enabled by a `[plugins.NAME]` table in the config (NAME is the entry
point's name). It declares:

    class MyPlugin:
        name = "my_plugin"
        class Config(pydantic.BaseModel):      # validates [plugins.my_plugin]
            model_config = ConfigDict(extra="forbid")
        async def start(self, ctx: PluginContext) -> None: ...
        async def stop(self) -> None: ...

The supervisor starts plugins in config order after the core features (and
before the broker subscription), stops them in reverse order, and contains
their failures: a plugin whose `start` raises, or whose `ctx.spawn`-ed task
fails later, is logged with its name, stopped, and started again (a fresh
instance) after an exponential backoff. While it is down its RPC operations
answer 503 `plugin_unavailable`. Nothing a plugin does takes the daemon down.

See plugins/README.md for the author's guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

from pydantic import BaseModel, ValidationError
from structlog.typing import FilteringBoundLogger

from provisiond.config import Config
from provisiond.errors import ConfigError, Unavailable
from provisiond.logs import get_logger
from provisiond.presence import PRESENCE
from provisiond.rpc import Operation, Request, Router
from provisiond.runtime.app import App
from provisiond.wifi.service import GRANTS, GrantService

log = get_logger("provisiond.plugins")

ENTRY_POINT_GROUP: Final = "provisiond.plugins"
# A table key the supervisor reads itself, so a plugin can be switched off
# without deleting its settings; it never reaches the plugin's own schema.
ENABLED_KEY: Final = "enabled"
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
# A plugin that ran this long before failing starts its backoff afresh.
STABLE_AFTER: Final = 60.0
# A start or stop that hangs must not hold the daemon's own start or stop.
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0


class Plugin(Protocol):
    """What a plugin class provides (structural: no base class needed)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    async def start(self, ctx: PluginContext) -> None: ...

    async def stop(self) -> None: ...


PluginClass = type[Any]


@dataclass(frozen=True)
class PluginSpec:
    """One enabled plugin: its config name, class and validated settings."""

    name: str
    cls: PluginClass
    config: BaseModel


def discover() -> dict[str, Any]:
    """Installed plugins by entry-point name, loaded only once `resolve` needs them."""
    return {
        ep.name: _LazyEntryPoint(ep)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }


class _LazyEntryPoint:
    """Stands in for a plugin class until it is enabled: importing a plugin
    nobody enabled must not be able to break (or slow) the daemon's start."""

    def __init__(self, ep: importlib.metadata.EntryPoint) -> None:
        self.ep = ep

    def load(self) -> PluginClass:
        loaded = self.ep.load()
        if not isinstance(loaded, type):
            raise TypeError(f"entry point {self.ep.value} is not a class")
        return loaded


def resolve(config: Config, available: Mapping[str, Any] | None = None) -> list[PluginSpec]:
    """Validate every `[plugins.NAME]` table against its plugin's schema.

    Raises ConfigError naming `plugins.NAME` or `plugins.NAME.key`, so a typo
    stops the daemon at start (exit 3) instead of silently running without it.
    """
    available = discover() if available is None else available
    specs: list[PluginSpec] = []
    for name, raw in config.plugins.items():
        key = f"plugins.{name}"
        if not isinstance(raw, dict):
            raise ConfigError("must be a table", key=key)
        table = dict(raw)
        enabled = table.pop(ENABLED_KEY, True)
        if not isinstance(enabled, bool):
            raise ConfigError("must be true or false", key=f"{key}.{ENABLED_KEY}")
        if not enabled:
            continue
        if name not in available:
            known = ", ".join(sorted(available)) or "none"
            raise ConfigError(f"no such plugin is installed (installed: {known})", key=key)
        cls = available[name]
        if isinstance(cls, _LazyEntryPoint):
            try:
                cls = cls.load()
            except Exception as exc:
                raise ConfigError(
                    f"plugin cannot be loaded: {exc.__class__.__name__}: {exc}", key=key
                ) from None
        schema = getattr(cls, "Config", None)
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise ConfigError("plugin declares no pydantic Config model", key=key)
        try:
            settings = schema.model_validate(table)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join([key, *(str(p) for p in first["loc"])])
            message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
            raise ConfigError(message, key=where) from None
        specs.append(PluginSpec(name, cls, settings))
    return specs


class PresenceChannel:
    """The presence API as a plugin sees it; a no-op when presence is absent."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def set_channel(self, device_id: int, channel: str, online: bool) -> None:
        service = self._app.services.find(PRESENCE)
        if service is None:
            return
        result = service.set_channel(device_id, channel, online)
        if inspect.isawaitable(result):
            await result


@dataclass
class PluginContext:
    """What a plugin gets. Everything except `app` is the supported API."""

    name: str
    config: Any
    log: FilteringBoundLogger
    presence: PresenceChannel
    # The daemon itself. Unstable: internals may change in any release.
    app: App
    _slot: _Slot = field(repr=False)

    @property
    def grants(self) -> GrantService | None:
        """The grant service (the WiFi feature's GRANTS), or None if not running."""
        return self.app.services.find(GRANTS)

    def register_operation(self, op: Operation) -> None:
        """Serve `P/rpc/<op.name>`; it answers 503 while this plugin is down."""
        self._slot.supervisor.register(self._slot, op)

    async def publish_event(self, name: str, payload: dict[str, Any]) -> None:
        """Publish `P/events/<name>`; the payload gains `"plugin": <name>`."""
        await self.app.publish_event(name, {**payload, "plugin": self.name})

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        """Run a background task; if it fails, the plugin is restarted."""
        self._slot.supervisor.spawn(self._slot, coro, name=name)


@dataclass
class _Slot:
    spec: PluginSpec
    supervisor: PluginSupervisor
    instance: Any = None
    state: str = "stopped"  # stopped | starting | running | backoff
    failures: int = 0
    delay: float = BACKOFF_INITIAL
    started_at: float = 0.0
    operations: dict[str, Operation] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    retry: asyncio.Task[None] | None = None
    # Serialises start/stop/failure handling of one plugin.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name


class PluginSupervisor:
    """Starts, stops and restarts the enabled plugins."""

    def __init__(
        self,
        app: App,
        router: Router,
        specs: list[PluginSpec],
        *,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
    ) -> None:
        self.app = app
        self.router = router
        # Read at construction, not import, so tests can shorten the backoff.
        self.backoff_initial = BACKOFF_INITIAL if backoff_initial is None else backoff_initial
        self.backoff_max = BACKOFF_MAX if backoff_max is None else backoff_max
        self._slots = [_Slot(spec, self, delay=self.backoff_initial) for spec in specs]
        self._stopping = False
        self._failures: set[asyncio.Task[None]] = set()
        app.stats_probes["plugins"] = self._stats

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._slots]

    def state(self, name: str) -> str:
        return next(s.state for s in self._slots if s.name == name)

    async def _stats(self) -> dict[str, Any]:
        return {s.name: {"state": s.state, "failures": s.failures} for s in self._slots}

    # ---- lifecycle

    async def start(self) -> None:
        """Start every plugin in config order; failures are retried in the background."""
        for slot in self._slots:
            if self._stopping:
                return
            async with slot.lock:
                await self._start_locked(slot)

    async def stop(self) -> None:
        """Stop every plugin in reverse order."""
        self._stopping = True
        if self._failures:
            await asyncio.gather(*self._failures, return_exceptions=True)
        for slot in reversed(self._slots):
            if slot.retry is not None:
                slot.retry.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.retry
            async with slot.lock:
                await self._stop_locked(slot)
                slot.state = "stopped"

    async def reconfigure(self, specs: list[PluginSpec]) -> tuple[list[str], list[str]]:
        """Apply reloaded plugin settings: a plugin whose validated settings
        changed is stopped and started again with them. Returns (restarted,
        needs a daemon restart): enabling or disabling a plugin changes which
        operations exist, which only a restart does."""
        by_name = {spec.name: spec for spec in specs}
        current = {slot.name for slot in self._slots}
        added_or_removed = sorted(set(by_name) ^ current)
        restarted: list[str] = []
        for slot in self._slots:
            new = by_name.get(slot.name)
            if new is None or new.config == slot.spec.config:
                continue
            if slot.retry is not None:
                slot.retry.cancel()
                slot.retry = None
            async with slot.lock:
                await self._stop_locked(slot)
                slot.spec = new
                slot.delay = self.backoff_initial
                await self._start_locked(slot)
            restarted.append(slot.name)
        return restarted, added_or_removed

    async def _start_locked(self, slot: _Slot) -> None:
        slot.state = "starting"
        slot.instance = slot.spec.cls()
        ctx = PluginContext(
            name=slot.name,
            config=slot.spec.config,
            log=log.bind(plugin=slot.name),
            presence=PresenceChannel(self.app),
            app=self.app,
            _slot=slot,
        )
        try:
            await asyncio.wait_for(slot.instance.start(ctx), START_TIMEOUT)
        except asyncio.CancelledError:
            await self._stop_locked(slot)
            raise
        except Exception as exc:
            await self._failed_locked(slot, exc, phase="start")
            return
        slot.state = "running"
        slot.started_at = self.app.clock.monotonic()
        self.app.counters[f"plugins.{slot.name}.started"] += 1
        log.info("plugin.started", plugin=slot.name, attempt=slot.failures + 1)

    async def _stop_locked(self, slot: _Slot) -> None:
        """Cancel the plugin's tasks and call its stop(); never raises."""
        current = asyncio.current_task()
        tasks = [t for t in slot.tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        instance, slot.instance = slot.instance, None
        if instance is None:
            return
        try:
            await asyncio.wait_for(instance.stop(), STOP_TIMEOUT)
        except Exception:
            log.exception("plugin.stop_failed", plugin=slot.name)
        else:
            if slot.state == "running":
                log.info("plugin.stopped", plugin=slot.name)

    async def _failed_locked(self, slot: _Slot, exc: BaseException, *, phase: str) -> None:
        now = self.app.clock.monotonic()
        if slot.state == "running" and now - slot.started_at >= STABLE_AFTER:
            slot.delay = self.backoff_initial
        slot.failures += 1
        self.app.counters[f"plugins.{slot.name}.failures"] += 1
        slot.state = "backoff"
        log.error(
            "plugin.failed",
            plugin=slot.name,
            phase=phase,
            error=f"{exc.__class__.__name__}: {exc}",
            retry_in_seconds=slot.delay,
            exc_info=exc,
        )
        await self._stop_locked(slot)
        slot.state = "backoff"
        if self._stopping:
            return
        delay = slot.delay
        slot.delay = min(slot.delay * 2, self.backoff_max)
        slot.retry = asyncio.get_running_loop().create_task(
            self._retry(slot, delay), name=f"plugin-retry-{slot.name}"
        )

    async def _retry(self, slot: _Slot, delay: float) -> None:
        await asyncio.sleep(delay)
        async with slot.lock:
            slot.retry = None
            if not self._stopping:
                await self._start_locked(slot)

    # ---- what the context delegates here

    def spawn(self, slot: _Slot, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        instance = slot.instance

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Handled outside this task's own cancellation: the failure
                # path stops the plugin, which cancels its tasks (not this one).
                failure = asyncio.get_running_loop().create_task(
                    self._task_failed(slot, instance, exc)
                )
                self._failures.add(failure)
                failure.add_done_callback(self._failures.discard)

        task = asyncio.get_running_loop().create_task(guarded(), name=f"plugin-{slot.name}-{name}")
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)

    async def _task_failed(self, slot: _Slot, instance: Any, exc: Exception) -> None:
        async with slot.lock:
            # A stale failure from an instance already replaced or stopped.
            if slot.instance is not instance or instance is None or self._stopping:
                return
            await self._failed_locked(slot, exc, phase="task")

    def register(self, slot: _Slot, op: Operation) -> None:
        # The router holds a stable wrapper: a restarted plugin re-registers
        # its handlers, and between runs the wrapper answers 503.
        handler = _guarded_handler(slot, op.name)
        handler.__doc__ = op.handler.__doc__
        self.router.register(
            Operation(op.name, handler, body=op.body, auth=op.auth, scope=op.scope),
            replace=op.name in slot.operations,
        )
        slot.operations[op.name] = op


def _guarded_handler(
    slot: _Slot, op_name: str
) -> Callable[[Request, Any], Awaitable[dict[str, Any]]]:
    async def handler(request: Request, body: Any) -> dict[str, Any]:
        op = slot.operations.get(op_name)
        if slot.state != "running" or op is None:
            raise Unavailable(f"plugin {slot.name} is not running", code="plugin_unavailable")
        request.log_fields["plugin"] = slot.name
        return await op.handler(request, body)

    return handler
