"""Presence from heartbeats and last wills, over a real mosquitto (docs/protocol.md §1, §6)."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from presence_support import FakeDevice, Watcher, seed_devices
from structlog.testing import LogCapture

from provisiond.config import Config
from provisiond.presence import PRESENCE, Presence
from provisiond.presence import tracker as presence_mod
from support import Broker, RpcClient, eventually, make_config, rows, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

FAST = {"heartbeat_interval_seconds": 0.3, "timeout_factor": 2, "min_interval_seconds": 0.1}


def fast_config(tmp_path: Path, broker: Broker, **presence: Any) -> Config:
    return make_config(tmp_path, broker, presence={**FAST, **presence})


def presence_service(server: Any) -> Presence:
    service = server.app.services.get(PRESENCE)
    assert isinstance(service, Presence)
    return service


async def test_online_on_first_heartbeat_offline_within_a_second_of_the_deadline(
    tmp_path: Path, broker: Broker
) -> None:
    config = fast_config(tmp_path, broker)
    seed_devices(config, [5])
    async with (
        running(config) as server,
        Watcher(config, ["devices/5/presence", "events/presence"]) as watch,
        FakeDevice(config, 5) as device,
    ):
        assert presence_service(server).presence_of(5) == {
            "online": False, "channels": [], "last_seen": None, "since": None,
        }  # fmt: skip
        await device.heartbeat(
            {"interval": 0.3, "uptime": 12, "rssi": -61, "firmware_version": "1.2"}
        )
        online, _ = await watch.got.wait_for("/devices/5/presence", lambda b: b["online"])
        assert online["channels"] == ["mqtt"]
        assert online["since"].endswith("Z") and online["last_seen"].endswith("Z")
        event, _ = await watch.got.wait_for("/events/presence", lambda b: b["online"])
        assert event["deviceId"] == 5 and event["event"] == "presence"

        # Heartbeats inside the deadline keep it online without republishing.
        for _ in range(6):
            await asyncio.sleep(0.2)
            sent = await device.heartbeat({"interval": 0.3})
        assert len(watch.got.on("/devices/5/presence")) == 1

        offline, arrived = await watch.got.wait_for(
            "/devices/5/presence", lambda b: not b["online"], timeout=5
        )
        deadline = sent + 0.3 * 2
        lateness = arrived - deadline
        assert -0.05 <= lateness <= 1.0, f"offline {lateness:.3f}s after the deadline"
        assert offline["channels"] == []
        await watch.got.wait_for("/events/presence", lambda b: not b["online"])
        assert presence_service(server).is_offline(5)


async def test_last_will_makes_a_device_offline_at_once(config: Config) -> None:
    seed_devices(config, [7])
    async with running(config), Watcher(config, ["devices/7/presence"]) as watch:
        device = FakeDevice(config, 7)
        await device.__aenter__()
        await device.status("online")
        await watch.got.wait_for("/devices/7/presence", lambda b: b["online"])
        device.kill()  # no DISCONNECT: the broker publishes the will
        killed = time.monotonic()
        _, arrived = await watch.got.wait_for("/devices/7/presence", lambda b: not b["online"])
        # The default deadline is 90 s; only the will explains going offline now.
        assert arrived - killed < 2.0
        await device.__aexit__(None, None, None)


async def test_heartbeat_with_interval_hint_is_clamped_and_keeps_device_online(
    tmp_path: Path, broker: Broker
) -> None:
    config = fast_config(tmp_path, broker, max_interval_seconds=1.0)
    seed_devices(config, [3])
    async with running(config) as server, FakeDevice(config, 3) as device:
        await device.heartbeat({"interval": 10_000, "other": "ignored"})
        service = presence_service(server)
        await eventually(lambda: service.mqtt_online(3))
        # Clamped to max_interval (1 s) x factor 2: offline after ~2 s, not 20000 s.
        await eventually(lambda: service.is_offline(3), timeout=4)


async def test_unknown_malformed_and_oversize_heartbeats_are_counted_never_stored(
    config: Config, logs: LogCapture
) -> None:
    seed_devices(config, [1])
    seed_devices(config, [2], state="pending")
    _, key = seed_key(config, scopes=("daemon:read",))
    async with running(config) as server, FakeDevice(config, 999) as sender:
        service = presence_service(server)
        app = server.app
        assert app is not None
        prefix = f"{config.mqtt.topic_prefix}/devices"
        client = sender.client

        async def flood(first: int, n: int) -> None:
            for i in range(first, first + n):
                await client.publish(f"{prefix}/{i}/heartbeat", b'{"interval": 30}', qos=0)

        await client.publish(f"{prefix}/2/heartbeat", b"", qos=0)  # pending, not active
        await client.publish(f"{prefix}/1/heartbeat", b"{nope", qos=0)
        await client.publish(f"{prefix}/1/heartbeat", b"[1]", qos=0)
        await client.publish(f"{prefix}/1/heartbeat", b'{"interval": "5"}', qos=0)
        await client.publish(f"{prefix}/1/heartbeat", b'{"interval": -1}', qos=0)
        await client.publish(f"{prefix}/1/heartbeat", b"[" * 4000, qos=0)
        await client.publish(f"{prefix}/1/heartbeat", b"x" * 5000, qos=0)
        await client.publish(f"{prefix}/01/heartbeat", b"", qos=0)
        await client.publish(f"{prefix}/abc/heartbeat", b"", qos=0)
        await client.publish(f"{prefix}/1/status", b"maybe", qos=1)
        await eventually(lambda: app.counters["presence.heartbeats"] >= 9)
        await eventually(lambda: app.counters["presence.heartbeats.unknown"] >= 1)
        assert app.counters["presence.heartbeats.malformed"] == 7
        assert app.counters["presence.heartbeats.oversize"] == 1
        assert app.counters["presence.status.malformed"] == 1
        assert service.is_offline(1) and service.presence_of(2) is None

        tracked = len(service._devices)
        lookups_before = app.counters["presence.lookups"]
        started = time.monotonic()

        def refused() -> int:
            counters = app.counters
            return (
                counters["presence.heartbeats.unknown"]
                + counters["presence.heartbeats.lookup_overflow"]
            )

        async def flooded(first: int, n: int, total: int) -> None:
            await flood(first, n)
            await eventually(lambda: app.counters["presence.heartbeats"] >= total, timeout=30)
            # Every id answered: queued ids leave `_pending` before their lookup
            # returns, so wait for the verdicts themselves (+1: device 2, pending).
            await eventually(lambda: refused() >= total - 9 + 1, timeout=30)
            await eventually(lambda: not service._pending, timeout=30)

        await flooded(1_000_000, 10_000, 10_009)
        assert len(service._devices) == tracked
        assert len(service._negative) <= presence_mod.NEGATIVE_MAX
        assert not service._pending and not service._dirty and not service._outbox
        # Then measure: two more floods of new ids under tracemalloc; what presence
        # holds after the second must be what it held after the first.
        tracemalloc.start()
        try:
            await flooded(2_000_000, 5_000, 15_009)
            gc.collect()
            first = tracemalloc.take_snapshot()
            await flooded(3_000_000, 5_000, 20_009)
            gc.collect()
            second = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        only_presence = [tracemalloc.Filter(True, presence_mod.__file__)]
        growth = sum(
            s.size_diff
            for s in second.filter_traces(only_presence).compare_to(
                first.filter_traces(only_presence), "filename"
            )
        )
        assert growth < 16 * 1024, f"presence grew {growth} bytes on 5k more unknown ids"
        assert len(service._devices) == tracked
        assert len(service._negative) <= presence_mod.NEGATIVE_MAX
        unknown = app.counters["presence.heartbeats.unknown"]
        overflow = app.counters["presence.heartbeats.lookup_overflow"]
        assert unknown + overflow == 20_001  # + device 2, which is pending
        # Unknown ids are looked up in batches: the store sees a bounded query
        # rate whatever the flood, never one query per message.
        lookups = app.counters["presence.lookups"] - lookups_before
        elapsed = time.monotonic() - started
        assert lookups <= elapsed / presence_mod.LOOKUP_PAUSE_SECONDS + 2, (lookups, elapsed)
        assert lookups < 20_000 / 10

        async with RpcClient(config) as rpc:
            stats = await rpc.call("daemon/stats", {}, key=key)
        probe = stats["body"]["presence"]
        assert probe["tracked"] == 1 and probe["online"] == 0
        assert probe["heartbeats_unknown"] == unknown
        assert probe["heartbeats_malformed"] == 7

        # Still serving: a real heartbeat is handled.
        await sender.client.publish(f"{prefix}/1/heartbeat", b"", qos=0)
        await eventually(lambda: service.mqtt_online(1))
    assert rows(config, "SELECT device_id FROM presence") == [(1,)]
    assert rows(config, "SELECT COUNT(*) FROM devices") == [(2,)]
    debug = [e for e in logs.entries if e["event"] == "presence.heartbeat_unknown"]
    assert 1 <= len(debug) <= 2 + elapsed / 10, "unknown heartbeats are logged at a limited rate"


async def test_device_activated_after_start_is_picked_up_from_the_store(config: Config) -> None:
    seed_devices(config, [1])
    async with running(config) as server, FakeDevice(config, 42) as device:
        service = presence_service(server)
        await device.heartbeat()
        await eventually(lambda: server.app.counters["presence.heartbeats.unknown"] == 1)  # type: ignore[union-attr]
        seed_devices(config, [42])  # activated by another path meanwhile
        service.device_activated(42)
        await device.heartbeat()
        await eventually(lambda: service.mqtt_online(42))


async def test_newly_active_device_is_found_by_one_store_lookup(config: Config) -> None:
    seed_devices(config, [1])
    async with running(config) as server, FakeDevice(config, 43) as device:
        seed_devices(config, [43])  # activated after the daemon loaded its list
        await device.heartbeat()
        service = presence_service(server)
        await eventually(lambda: service.mqtt_online(43))
        for _ in range(5):
            await device.heartbeat()
        assert server.app.counters["presence.lookups"] == 1  # type: ignore[union-attr]


async def test_presence_survives_a_restart(config: Config) -> None:
    seed_devices(config, [1, 2, 3])
    async with (
        running(config) as server,
        FakeDevice(config, 1) as one,
        FakeDevice(config, 2) as two,
    ):
        service = presence_service(server)
        await one.heartbeat({"interval": 30})
        await two.heartbeat({"interval": 1})  # deadline: 3 s
        await eventually(lambda: service.mqtt_online(1) and service.mqtt_online(2))
        before = service.presence_of(1)
    # Stopped: the stop hook saved presence (no wait for the periodic flush).
    saved = rows(config, "SELECT device_id, online, channels FROM presence ORDER BY device_id")
    assert saved == [(1, 1, '["mqtt"]'), (2, 1, '["mqtt"]')]
    await asyncio.sleep(3.2)  # device 2's deadline passes while the daemon is down

    async with Watcher(config, ["devices/+/presence"]) as watch, running(config) as server:
        service = presence_service(server)
        assert service.presence_of(1) == before
        assert not service.is_offline(1)
        assert service.is_offline(2)
        # The missed transition is published once the daemon is back.
        body, _ = await watch.got.wait_for("/devices/2/presence", lambda b: not b["online"])
        assert body["channels"] == []
        assert service.presence_of(3) == {
            "online": False, "channels": [], "last_seen": None, "since": None,
        }  # fmt: skip
    assert rows(config, "SELECT online FROM presence WHERE device_id = 2") == [(0,)]


async def test_plugin_channel_and_device_is_offline(config: Config) -> None:
    seed_devices(config, [9])
    async with (
        running(config) as server,
        Watcher(config, ["devices/9/presence"]) as watch,
        FakeDevice(config, 9) as device,
    ):
        service = presence_service(server)
        assert service.set_channel(9, "ble", True)
        await watch.got.wait_for("/devices/9/presence", lambda b: b["channels"] == ["ble"])
        assert not service.is_offline(9) and not service.mqtt_online(9)
        await device.heartbeat()
        await watch.got.wait_for("/devices/9/presence", lambda b: b["channels"] == ["mqtt", "ble"])
        assert service.set_channel(9, "ble", False)
        await watch.got.wait_for("/devices/9/presence", lambda b: b["channels"] == ["mqtt"])
        await device.status("offline")
        await watch.got.wait_for("/devices/9/presence", lambda b: not b["online"])
        assert service.is_offline(9)
        assert not service.set_channel(12345, "ble", True)  # not an active device


async def test_retained_online_status_is_not_evidence_but_retained_will_is(config: Config) -> None:
    seed_devices(config, [4, 6])
    async with aiomqtt.Client("127.0.0.1", config.mqtt.port) as client:
        prefix = f"{config.mqtt.topic_prefix}/devices"
        await client.publish(f"{prefix}/4/status", b"online", qos=1, retain=True)
        await client.publish(f"{prefix}/6/status", b"offline", qos=1, retain=True)
    async with running(config) as server:
        service = presence_service(server)
        app = server.app
        assert app is not None
        await eventually(lambda: app.counters["presence.status.retained_online_ignored"] == 1)
        await eventually(lambda: app.counters["presence.status.offline"] == 1)
        assert service.is_offline(4) and service.is_offline(6)


async def test_stats_probe_and_no_write_per_heartbeat(config: Config) -> None:
    seed_devices(config, range(1, 51))
    _, key = seed_key(config, scopes=("daemon:read",))
    async with running(config) as server, FakeDevice(config, 999) as sender:
        app = server.app
        assert app is not None
        writes = 0
        real_write = app.store.write

        async def counting_write(fn: Any) -> Any:
            nonlocal writes
            writes += 1
            return await real_write(fn)

        app.store.write = counting_write  # type: ignore[method-assign]
        prefix = f"{config.mqtt.topic_prefix}/devices"
        for _ in range(10):
            for i in range(1, 51):
                await sender.client.publish(f"{prefix}/{i}/heartbeat", b"", qos=0)
        await eventually(lambda: app.counters["presence.heartbeats"] >= 500)
        await eventually(lambda: app.counters["presence.flush.rows"] >= 50, timeout=3)
        assert writes <= 3, f"{writes} store writes for 500 heartbeats"
        async with RpcClient(config) as rpc:
            stats = await rpc.call("daemon/stats", {}, key=key)
        probe = stats["body"]["presence"]
        assert (probe["tracked"], probe["online"], probe["offline"]) == (50, 50, 0)
        assert probe["heartbeats"] == 500
    saved = rows(config, "SELECT COUNT(*), MIN(last_seen) FROM presence WHERE online = 1")
    assert saved[0][0] == 50 and saved[0][1] is not None


def test_parse_device_id_refuses_non_canonical_ids() -> None:
    parse = presence_mod.parse_device_id
    assert parse("17") == 17
    for bad in ("", "0", "017", "+1", "-1", "1.0", " 1", "١٢", "9" * 30, "abc"):
        assert parse(bad) is None, bad
