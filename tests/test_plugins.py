"""Plugin API: discovery, config validation, start/stop order, failure containment."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict
from structlog.testing import LogCapture

from provisiond import plugins
from provisiond.config import Config
from provisiond.errors import ConfigError
from provisiond.plugins import PluginContext
from provisiond.rpc import EmptyBody, Operation, Request
from provisiond.server import Server
from provisiond.store import open_database, table_names
from provisiond_example import ExamplePlugin
from support import Broker, RpcClient, eventually, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]


class _Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


EVENTS: list[str] = []


def recording(label: str) -> type:
    class Recording:
        name: ClassVar[str] = label
        Config: ClassVar[type[BaseModel]] = _Empty

        async def start(self, ctx: PluginContext) -> None:
            EVENTS.append(f"start {label}")

        async def stop(self) -> None:
            EVENTS.append(f"stop {label}")

    return Recording


class FailsAtStart:
    """Registers an operation, then fails to start twice, then works."""

    name: ClassVar[str] = "flaky"
    Config: ClassVar[type[BaseModel]] = _Empty
    attempts: ClassVar[int] = 0

    async def start(self, ctx: PluginContext) -> None:
        async def ping(_request: Request, _body: EmptyBody) -> dict[str, Any]:
            return {"pong": True}

        ctx.register_operation(Operation("flaky/ping", ping, scope="daemon:read"))
        type(self).attempts += 1
        if type(self).attempts <= 2:
            raise RuntimeError("radio not found")

    async def stop(self) -> None:
        pass


class FailsLater:
    """Starts fine; its background task dies once; the restarted instance stays up."""

    name: ClassVar[str] = "crashy"
    Config: ClassVar[type[BaseModel]] = _Empty
    starts: ClassVar[int] = 0
    stops: ClassVar[int] = 0

    async def start(self, ctx: PluginContext) -> None:
        type(self).starts += 1
        first = type(self).starts == 1

        async def ping(_request: Request, _body: EmptyBody) -> dict[str, Any]:
            return {"run": type(self).starts}

        ctx.register_operation(Operation("crashy/ping", ping, scope="daemon:read"))

        async def worker() -> None:
            await asyncio.sleep(0.3)
            if first:
                raise ValueError("worker lost its socket")
            await asyncio.Event().wait()

        ctx.spawn(worker(), name="worker")

    async def stop(self) -> None:
        type(self).stops += 1


def example_config(tmp_path: Path, broker: Broker) -> tuple[Config, str]:
    """A config running the example plugin with greeting "hi", and an API key for it."""
    config = make_config(tmp_path, broker, plugins={"example": {"greeting": "hi"}})
    return config, seed_key(config)[1]


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # Short enough to watch, long enough that a loaded machine still sees the 503 between runs.
    monkeypatch.setattr(plugins, "BACKOFF_INITIAL", 1.0)
    monkeypatch.setattr(plugins, "BACKOFF_MAX", 4.0)


async def test_example_plugin_from_entry_point(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    config, key = example_config(tmp_path, broker)
    async with running(config) as server, RpcClient(config) as rpc:
        # Found through the installed entry point, not handed in by the test.
        assert server.supervisor is not None and server.supervisor.names == ["example"]
        await rpc.client.subscribe(f"{config.mqtt.topic_prefix}/events/example/#", qos=1)
        reply = await rpc.call("example/echo", {"message": "ping"}, key=key)
        assert reply == {"status": 200, "body": {"echo": "ping", "greeting": "hi"}}
        await eventually(lambda: any(e.get("event") == "example/echoed" for e in rpc.unmatched))
        event = next(e for e in rpc.unmatched if e.get("event") == "example/echoed")
        assert event["plugin"] == "example" and event["length"] == 4
        bad = await rpc.call("example/echo", {"message": "x", "extra": 1}, key=key)
        assert bad["status"] == 400 and bad["error"]["field"] == "extra"
        stats = await rpc.call("daemon/stats", {}, key=key)
        assert stats["body"]["plugins"] == {"example": {"state": "running", "failures": 0}}
    assert any(e["event"] == "example.started" and e["plugin"] == "example" for e in logs.entries)


def test_unknown_plugin_key_is_a_config_error(tmp_path: Path, broker: Broker) -> None:
    config = make_config(tmp_path, broker, plugins={"example": {"greting": "typo"}})
    with pytest.raises(ConfigError) as exc:
        plugins.resolve(config, {"example": ExamplePlugin})
    assert exc.value.key == "plugins.example.greting"

    config = make_config(tmp_path, broker, plugins={"nosuch": {}})
    with pytest.raises(ConfigError) as exc:
        plugins.resolve(config, {"example": ExamplePlugin})
    assert exc.value.key == "plugins.nosuch"

    config = make_config(tmp_path, broker, plugins={"example": {"tick_seconds": -1}})
    with pytest.raises(ConfigError) as exc:
        plugins.resolve(config, {"example": ExamplePlugin})
    assert exc.value.key == "plugins.example.tick_seconds"

    # `enabled = false` switches a plugin off without deleting its table.
    config = make_config(tmp_path, broker, plugins={"example": {"enabled": False, "greting": 1}})
    assert plugins.resolve(config, {"example": ExamplePlugin}) == []


def test_bad_plugin_table_exits_3(tmp_path: Path, broker: Broker) -> None:
    path = tmp_path / "provisiond.toml"
    path.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n\n'
        f'[store]\npath = "{tmp_path / "x.db"}"\n\n'
        '[plugins.example]\ngreeting = "hi"\nbogus = 1\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "provisiond", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert "plugins.example.bogus" in proc.stderr


async def test_start_and_stop_order(tmp_path: Path, broker: Broker) -> None:
    EVENTS.clear()
    config = make_config(tmp_path, broker, plugins={"b": {}, "a": {}, "c": {}})
    classes = {name: recording(name) for name in ("a", "b", "c")}
    async with running(config, plugins=classes):
        # Config order, and all started before the daemon is ready.
        assert EVENTS == ["start b", "start a", "start c"]
    assert EVENTS[3:] == ["stop c", "stop a", "stop b"]


async def test_plugin_failing_at_start_is_retried(
    tmp_path: Path, broker: Broker, logs: LogCapture, fast_backoff: None
) -> None:
    FailsAtStart.attempts = 0
    config = make_config(tmp_path, broker, plugins={"flaky": {}})
    _, key = seed_key(config)
    async with running(config, plugins={"flaky": FailsAtStart}) as server, RpcClient(config) as rpc:
        # The daemon is up and answering while the plugin is down.
        down = await rpc.call("flaky/ping", {}, key=key)
        assert down["status"] == 503 and down["error"]["code"] == "plugin_unavailable"
        assert (await rpc.call("daemon/stats", {}, key=key))["status"] == 200
        assert server.supervisor is not None
        await eventually(lambda: server.supervisor.state("flaky") == "running", timeout=15)
        assert FailsAtStart.attempts == 3
        assert await rpc.call("flaky/ping", {}, key=key) == {"status": 200, "body": {"pong": True}}
    failures = [e for e in logs.entries if e["event"] == "plugin.failed"]
    assert len(failures) == 2
    assert all(e["plugin"] == "flaky" and e["phase"] == "start" for e in failures)
    assert "radio not found" in failures[0]["error"]
    # Exponential: the second wait is twice the first.
    assert [e["retry_in_seconds"] for e in failures] == [1.0, 2.0]


async def test_plugin_failing_later_is_restarted(
    tmp_path: Path, broker: Broker, logs: LogCapture, fast_backoff: None
) -> None:
    FailsLater.starts = FailsLater.stops = 0
    config = make_config(tmp_path, broker, plugins={"crashy": {}})
    _, key = seed_key(config)
    async with running(config, plugins={"crashy": FailsLater}) as server, RpcClient(config) as rpc:
        assert await rpc.call("crashy/ping", {}, key=key) == {"status": 200, "body": {"run": 1}}
        await eventually(lambda: any(e["event"] == "plugin.failed" for e in logs.entries))
        failed = next(e for e in logs.entries if e["event"] == "plugin.failed")
        assert failed["plugin"] == "crashy" and failed["phase"] == "task"
        assert "worker lost its socket" in failed["error"]
        assert FailsLater.stops == 1  # stopped before it is retried
        down = await rpc.call("crashy/ping", {}, key=key)
        assert down["status"] == 503 and down["error"]["code"] == "plugin_unavailable"
        assert (await rpc.call("daemon/stats", {}, key=key))["status"] == 200
        assert server.supervisor is not None
        await eventually(lambda: server.supervisor.state("crashy") == "running", timeout=15)
        assert await rpc.call("crashy/ping", {}, key=key) == {"status": 200, "body": {"run": 2}}
    assert FailsLater.stops == 2


async def test_plugin_cannot_take_over_core_operation(
    tmp_path: Path, broker: Broker, logs: LogCapture, fast_backoff: None
) -> None:
    class Hijack:
        name: ClassVar[str] = "hijack"
        Config: ClassVar[type[BaseModel]] = _Empty

        async def start(self, ctx: PluginContext) -> None:
            async def stats(_request: Request, _body: EmptyBody) -> dict[str, Any]:
                return {"hijacked": True}

            ctx.register_operation(Operation("daemon/stats", stats, scope="daemon:read"))

        async def stop(self) -> None:
            pass

    config = make_config(tmp_path, broker, plugins={"hijack": {}})
    _, key = seed_key(config)
    async with running(config, plugins={"hijack": Hijack}) as server, RpcClient(config) as rpc:
        reply = await rpc.call("daemon/stats", {}, key=key)
        assert reply["status"] == 200 and "hijacked" not in reply["body"]
        assert server.supervisor is not None and server.supervisor.state("hijack") != "running"
    assert any(
        e["event"] == "plugin.failed" and "already registered" in e["error"] for e in logs.entries
    )


def test_server_validates_plugins_before_opening_anything(tmp_path: Path, broker: Broker) -> None:
    config = make_config(tmp_path, broker, plugins={"example": {"nope": 1}})
    with pytest.raises(ConfigError):
        asyncio.run(Server(config, plugins={"example": ExamplePlugin}).serve())
    if config.store.url:
        # The test's fresh database: still without a single table (not migrated).
        db = open_database(config.store.url)
        try:
            assert table_names(db) == []
        finally:
            db.conn.close()
    else:
        assert not Path(config.store.path).exists()


async def test_reload_applies_new_plugin_settings(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    config, key = example_config(tmp_path, broker)
    async with running(config) as server, RpcClient(config) as rpc:
        reply = await rpc.call("example/echo", {"message": "a"}, key=key)
        assert reply["body"]["greeting"] == "hi"
        # The same path SIGHUP takes: a new config whose plugin table changed.
        changed = config.model_copy(update={"plugins": {"example": {"greeting": "bonjour"}}})
        assert await server.reload(changed)
        reply = await rpc.call("example/echo", {"message": "b"}, key=key)
        assert reply["body"]["greeting"] == "bonjour"
        # A plugin table its schema refuses is refused whole; the running settings stay.
        broken = config.model_copy(update={"plugins": {"example": {"greting": "typo"}}})
        assert not await server.reload(broken)
        reply = await rpc.call("example/echo", {"message": "c"}, key=key)
        assert reply["body"]["greeting"] == "bonjour"
    assert any(e["event"] == "plugins.reconfigured" for e in logs.entries)


def test_check_config_judges_plugin_tables(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[plugins.example]\ngreting = "typo"\n')
    env = {"PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "provisiond", "check-config", "-c", str(path)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 3 and "plugins.example.greting" in proc.stderr
