"""Signals: SIGTERM drains and exits 0, SIGHUP reloads the config (or refuses a bad one)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess, NotifySocket, daemon_process, write_toml
from structlog.testing import LogCapture

from provisiond.config import Config
from provisiond.runtime.features import FEATURES
from provisiond.server import Server
from support import SLOW_FEATURE, RpcClient, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

GRACE = 5.0


@contextlib.asynccontextmanager
async def ready_daemon(
    config: Config, config_file: Path
) -> AsyncIterator[tuple[RpcClient, DaemonProcess, NotifySocket]]:
    """The daemon as a process, once it has said READY=1, and a client connected before it."""
    notify = NotifySocket()
    notify.start()
    async with RpcClient(config) as rpc, daemon_process(config_file, notify) as daemon:
        try:
            await notify.wait_for("READY=1")
        except TimeoutError:
            pytest.fail(f"no READY=1; daemon output:\n{daemon.tail()}")
        yield rpc, daemon, notify
    notify.close()


async def test_sigterm_answers_every_request_in_flight_and_exits_0(
    config: Config, tmp_path: Path
) -> None:
    _key_id, secret = seed_key(config, scopes=("devices:read",))
    config_file = write_toml(
        config,
        tmp_path / "provisiond.toml",
        log={"format": "json"},
        daemon={"shutdown_grace_seconds": GRACE},
    )
    async with ready_daemon(config, config_file) as (rpc, daemon, _notify):
        futures = await asyncio.gather(*(rpc.send("keys/whoami", key=secret) for _ in range(200)))
        # Every request is with the broker (PUBACKed) and on its way to the
        # daemon; once it has answered one it is busy with the rest.
        await asyncio.wait(futures, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        daemon.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        answered_before = sum(f.done() for f in futures)
        # Otherwise the signal came too late to prove anything about draining.
        assert answered_before < 200
        replies = await asyncio.wait_for(asyncio.gather(*futures), GRACE + 5)
        code = await daemon.wait(timeout=GRACE + 5)
        took = time.monotonic() - stopped_at

    assert code == 0, daemon.tail()
    assert took < GRACE + 3, took
    statuses = [r["status"] for r in replies]
    # A request the router had started is finished (200); one that reached it
    # after the drain began is refused at once with 503 shutting_down, never dropped.
    assert set(statuses) <= {200, 503}, statuses
    for reply in replies:
        if reply["status"] == 503:
            assert reply["error"]["code"] == "shutting_down"
    assert statuses.count(200) >= 1
    assert not daemon.named("daemon.drain_timeout")
    print(f"before SIGTERM {answered_before} answered; then {statuses.count(200)} x 200, "
          f"{statuses.count(503)} x 503; exit after {took:.2f}s")  # fmt: skip


async def test_sighup_refuses_a_broken_config_and_applies_a_good_one(
    config: Config, tmp_path: Path
) -> None:
    _key_id, secret = seed_key(config, scopes=("devices:read",))
    config_file = write_toml(config, tmp_path / "provisiond.toml", log={"format": "json"})
    good = config_file.read_text()
    async with ready_daemon(config, config_file) as (rpc, daemon, notify):
        assert (await rpc.call("keys/whoami", key=secret))["status"] == 200
        await daemon.wait_event("rpc", count=1)

        # Broken: a misspelt key. Refused with a log line naming it; the daemon carries on.
        config_file.write_text(good.replace("[log]\n", "[log]\nlevle = 'debug'\n"))
        daemon.signal(signal.SIGHUP)
        refused = await daemon.wait_event("config.reload_refused")
        assert "log.levle" in refused["error"]
        assert (await rpc.call("keys/whoami", key=secret))["status"] == 200
        await daemon.wait_event("rpc", count=2)  # still at info: the old config stands

        # Good: quieter logging, plus a broker port change that needs a restart.
        config_file.write_text(
            good.replace('level = "info"', 'level = "warning"').replace(
                f"port = {config.mqtt.port}", "port = 1"
            )
        )
        mark = len(notify.lines())
        daemon.signal(signal.SIGHUP)
        reloading = await notify.wait_for(lambda line: line == "RELOADING=1", after=mark)
        await notify.wait_for("READY=1", after=reloading)
        assert any(line.startswith("MONOTONIC_USEC=") for _t, line in notify.lines()[reloading:])
        pinned = await daemon.wait_event("config.needs_restart")
        assert pinned["keys"] == ["mqtt.port"]
        # Still connected on the old port, and the rpc line (info) is no longer printed.
        assert (await rpc.call("keys/whoami", key=secret))["status"] == 200
        await asyncio.sleep(0.3)
        assert len(daemon.named("rpc")) == 2

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0, daemon.tail()


# --- Server.reload in-process: what a reload changes, keeps and rolls back


async def test_reload_applies_limits_and_keeps_restart_only_keys(
    config: Config, daemon: Server, rpc: RpcClient, logs: LogCapture
) -> None:
    _key_id, secret = seed_key(config, scopes=("devices:read",))
    assert (await rpc.call("keys/whoami", key=secret))["status"] == 200
    new = config.model_copy(
        update={
            "limits": config.limits.model_copy(update={"rate_per_key": 0.001, "burst_per_key": 1}),
            "mqtt": config.mqtt.model_copy(update={"keepalive_seconds": 99}),
            "daemon": config.daemon.model_copy(update={"max_concurrent_requests": 3}),
        }
    )
    assert await daemon.reload(new)
    assert daemon.app is not None
    assert daemon.app.config.limits.rate_per_key == 0.001
    assert daemon.app.config.mqtt == config.mqtt
    assert daemon.app.config.daemon.max_concurrent_requests == config.daemon.max_concurrent_requests
    statuses = [(await rpc.call("keys/whoami", key=secret))["status"] for _ in range(3)]
    assert statuses[0] == 200 and statuses[1:] == [429, 429]
    warned = [e for e in logs.entries if e["event"] == "config.needs_restart"]
    assert warned[0]["keys"] == ["daemon.max_concurrent_requests", "mqtt.keepalive_seconds"]
    reloaded = [e for e in logs.entries if e["event"] == "config.reloaded"]
    assert reloaded[0]["changed"] == ["limits.burst_per_key", "limits.rate_per_key"]


async def test_a_reload_hook_that_refuses_rolls_everything_back(
    config: Config, daemon: Server, logs: LogCapture
) -> None:
    assert daemon.app is not None
    seen: list[float] = []

    async def accepts(new: Config) -> None:
        seen.append(new.limits.rate_per_key)

    async def refuses(new: Config) -> None:
        if new.limits.rate_per_key > 0:
            raise ValueError("this feature cannot run with a rate limit")

    daemon.app.on_reload.extend([accepts, refuses])
    new = config.model_copy(
        update={"limits": config.limits.model_copy(update={"rate_per_key": 5.0})}
    )
    assert not await daemon.reload(new)
    assert daemon.app.config is config and daemon.config is config
    # The hook that had accepted was told the old config again.
    assert seen == [5.0, 0.0]
    assert [e["event"] for e in logs.entries if e["event"].startswith("config.")] == [
        "config.reload_refused"
    ]


async def test_reload_from_a_file_that_does_not_load_keeps_the_old_config(
    config: Config, daemon: Server, tmp_path: Path, logs: LogCapture
) -> None:
    from provisiond.config import load

    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nrate_per_key = -1\n")
    assert not await daemon.reload_from(lambda: load(bad))
    assert daemon.app is not None and daemon.app.config is config
    refused = [e for e in logs.entries if e["event"] == "config.reload_refused"]
    assert "limits.rate_per_key" in refused[0]["error"]


# --- the drain in-process, with requests that are certainly in flight


async def test_drain_finishes_accepted_requests_and_refuses_later_ones(
    broker: object, tmp_path: Path, logs: LogCapture
) -> None:
    config = make_config(tmp_path, broker, daemon={"shutdown_grace_seconds": GRACE})  # type: ignore[arg-type]
    _key_id, secret = seed_key(config)
    async with (
        RpcClient(config) as rpc,
        running(config, features=[*FEATURES, SLOW_FEATURE]) as server,
    ):
        assert server.router is not None
        accepted = [await rpc.send("test/slow", {"seconds": 1.0}, key=secret) for _ in range(20)]
        deadline = asyncio.get_running_loop().time() + 5
        while server.router.inflight < 20 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert server.router.inflight == 20
        stopped_at = asyncio.get_running_loop().time()
        server.request_stop()
        await asyncio.sleep(0.1)
        late = [await rpc.send("test/slow", {"seconds": 0.0}, key=secret) for _ in range(5)]
        first = await asyncio.wait_for(asyncio.gather(*accepted), GRACE)
        second = await asyncio.wait_for(asyncio.gather(*late), GRACE)
        assert [r["status"] for r in first] == [200] * 20
        assert [(r["status"], r["error"]["code"]) for r in second] == [(503, "shutting_down")] * 5
    took = asyncio.get_running_loop().time() - stopped_at
    assert took < GRACE, took
    assert not [e for e in logs.entries if e["event"] == "daemon.drain_timeout"]


async def test_drain_gives_up_at_the_grace_period(
    broker: object, tmp_path: Path, logs: LogCapture
) -> None:
    config = make_config(tmp_path, broker, daemon={"shutdown_grace_seconds": 0.5})  # type: ignore[arg-type]
    _key_id, secret = seed_key(config)
    async with RpcClient(config) as rpc:
        async with running(config, features=[*FEATURES, SLOW_FEATURE]) as server:
            assert server.router is not None
            await rpc.send("test/slow", {"seconds": 30.0}, key=secret)
            deadline = asyncio.get_running_loop().time() + 5
            while server.router.inflight < 1 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            stopped_at = asyncio.get_running_loop().time()
        took = asyncio.get_running_loop().time() - stopped_at
    assert 0.5 <= took < 3, took
    timeout = [e for e in logs.entries if e["event"] == "daemon.drain_timeout"]
    assert timeout and timeout[0]["unanswered"] == 1


async def test_reload_refuses_a_plugin_table_its_plugin_would_refuse(
    config: Config, daemon: Server, logs: LogCapture
) -> None:
    new = config.model_copy(update={"plugins": {"no_such_plugin": {}}})
    assert not await daemon.reload(new)
    assert daemon.app is not None and daemon.app.config is config
    refused = [e for e in logs.entries if e["event"] == "config.reload_refused"]
    assert "plugins.no_such_plugin" in refused[0]["error"]
