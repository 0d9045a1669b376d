"""Reconfigure commands: stored first, delivered when the device is online (docs/protocol.md §4, §6)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from presence_support import FakeDevice, Watcher, seed_devices

from provisiond.config import Config
from provisiond.presence import PRESENCE, Presence
from provisiond.server import Server
from support import Broker, RpcClient, eventually, make_config, rows, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ALL = ("devices:read", "devices:write", "provision:write", "daemon:read")


def org_key(config: Config, **kwargs: Any) -> str:
    return seed_key(config, scopes=ALL, **kwargs)[1]


def command_row(config: Config, command_id: str) -> tuple[Any, ...]:
    found = rows(
        config,
        "SELECT state, device_id, sent_at IS NOT NULL, acked_at IS NOT NULL, result"
        " FROM commands WHERE id = ?",
        (command_id,),
    )
    assert found, command_id
    return found[0]


@contextlib.asynccontextmanager
async def daemon_and_device(
    config: Config, device_id: int
) -> AsyncIterator[tuple[Server, RpcClient, FakeDevice, str]]:
    """A running daemon, a client with an org key, and seeded device `device_id` connected."""
    seed_devices(config, [device_id])
    key = org_key(config)
    async with (
        running(config) as server,
        RpcClient(config) as rpc,
        FakeDevice(config, device_id) as device,
    ):
        yield server, rpc, device, key


async def online(server: Any, device: FakeDevice) -> None:
    service: Presence = server.app.services.get(PRESENCE)
    await device.heartbeat()
    await eventually(lambda: service.mqtt_online(device.device_id))


async def test_reconfigure_online_device_is_delivered_and_ack_recorded(config: Config) -> None:
    seed_devices(config, [11])
    key = org_key(config)
    async with (
        running(config) as server,
        Watcher(config, ["events/command"]) as events,
        RpcClient(config) as rpc,
        FakeDevice(config, 11) as device,
    ):
        await online(server, device)
        reply = await rpc.call("provision/reconfigure", {"deviceId": 11}, key=key)
        assert reply["status"] == 200, reply
        body = reply["body"]
        assert body["deviceIsOffline"] is False
        command_id = body["commandId"]
        assert command_id.startswith("cmd_") and len(command_id) == 20

        cmd, _ = await device.got.wait_for("/commands/reconfigure")
        assert cmd["id"] == command_id and cmd["command"] == "reconfigure"
        assert cmd["issued_at"].endswith("Z") and cmd["expires_at"] > cmd["issued_at"]
        await eventually(lambda: command_row(config, command_id)[0] == "sent")

        await device.ack(command_id, {"ok": True})
        await eventually(lambda: command_row(config, command_id)[0] == "acked")
        assert command_row(config, command_id) == ("acked", 11, 1, 1, '{"ok":true}')
        states = []
        for state in ("queued", "sent", "acked"):
            event, _ = await events.got.wait_for(
                "/events/command", lambda b, s=state: b["state"] == s
            )
            assert event["commandId"] == command_id and event["deviceId"] == 11
            states.append(event["state"])
        assert [b["state"] for b, _ in events.got.on("/events/command")] == [
            "queued",
            "sent",
            "acked",
        ]
        assert len(device.commands) == 1


async def test_reconfigure_offline_device_is_queued_until_its_next_heartbeat(
    config: Config,
) -> None:
    async with daemon_and_device(config, 12) as (server, rpc, device, key):
        reply = await rpc.call("provision/reconfigure", {"deviceId": 12}, key=key)
        assert reply["status"] == 200
        assert reply["body"]["deviceIsOffline"] is True
        command_id = reply["body"]["commandId"]
        await asyncio.sleep(0.5)
        assert device.commands == []
        assert command_row(config, command_id)[0] == "queued"

        await device.heartbeat()
        cmd, _ = await device.got.wait_for("/commands/reconfigure")
        assert cmd["id"] == command_id
        await eventually(lambda: command_row(config, command_id)[0] == "sent")
        # More heartbeats (and a status online) do not send it again.
        await device.heartbeat()
        await device.status("online")
        await asyncio.sleep(0.5)
        assert len(device.commands) == 1
        assert server is not None


async def test_expired_command_is_never_sent(tmp_path: Path, broker: Broker) -> None:
    config = make_config(tmp_path, broker, commands={"ttl_seconds": 1})
    seed_devices(config, [13])
    key = org_key(config)
    async with (
        running(config),
        Watcher(config, ["events/command"]) as events,
        RpcClient(config) as rpc,
        FakeDevice(config, 13) as device,
    ):
        reply = await rpc.call("provision/reconfigure", {"deviceId": 13}, key=key)
        command_id = reply["body"]["commandId"]
        # The sweeper marks it expired within a second of its expiry.
        await events.got.wait_for("/events/command", lambda b: b["state"] == "expired", timeout=4)
        assert command_row(config, command_id)[0] == "expired"
        await device.heartbeat()
        await asyncio.sleep(0.7)
        assert device.commands == []
        assert command_row(config, command_id)[:3] == ("expired", 13, 0)


async def test_command_queued_before_a_restart_is_delivered_exactly_once(
    tmp_path: Path, own_broker: Broker
) -> None:
    config = make_config(tmp_path, own_broker)
    seed_devices(config, [14])
    key = org_key(config)
    async with running(config), RpcClient(config) as rpc:
        reply = await rpc.call("provision/reconfigure", {"deviceId": 14}, key=key)
        assert reply["body"]["deviceIsOffline"] is True
        command_id = reply["body"]["commandId"]
    assert command_row(config, command_id)[0] == "queued"

    async with running(config) as server, FakeDevice(config, 14) as device:
        await device.heartbeat()
        cmd, _ = await device.got.wait_for("/commands/reconfigure")
        assert cmd["id"] == command_id
        await eventually(lambda: command_row(config, command_id)[0] == "sent")
        await device.heartbeat()
        await asyncio.sleep(2.5)  # a couple of sweeps
        assert len(device.commands) == 1

    # And after another restart with the device still online, still once.
    async with running(config), FakeDevice(config, 14) as device:
        await device.heartbeat()
        await asyncio.sleep(1.5)
        assert device.commands == []
    assert server is not None


async def test_newer_reconfigure_supersedes_an_unsent_one(config: Config) -> None:
    async with daemon_and_device(config, 15) as (_server, rpc, device, key):
        first = (await rpc.call("provision/reconfigure", {"deviceId": 15}, key=key))["body"]
        second = (await rpc.call("provision/reconfigure", {"deviceId": 15}, key=key))["body"]
        assert command_row(config, first["commandId"])[0] == "superseded"
        await device.heartbeat()
        cmd, _ = await device.got.wait_for("/commands/reconfigure")
        assert cmd["id"] == second["commandId"]
        await asyncio.sleep(0.5)
        assert [c["id"] for c in device.commands] == [second["commandId"]]


async def test_reconfigure_permissions_and_states(config: Config) -> None:
    seed_devices(config, [21], owner=1)
    seed_devices(config, [22], owner=2)
    seed_devices(config, [23], owner=1, state="pending")
    seed_devices(config, [31], org=2, owner=30)
    org1 = org_key(config)
    mine = org_key(config, user=1, permissions=("PROVISION_DEVICES", "OWN_DEVICES_VIEW"))
    all_of_org = org_key(config, user=1, permissions=("PROVISION_DEVICES", "ORG_DEVICES_VIEW"))
    no_provision = org_key(config, user=1, permissions=("OWN_DEVICES_VIEW",))
    no_view = org_key(config, user=1, permissions=("PROVISION_DEVICES",))
    _, read_only = seed_key(config, scopes=("devices:read",))
    async with running(config), RpcClient(config) as rpc:

        async def status(key: str, body: Any) -> tuple[int, str | None]:
            reply = await rpc.call("provision/reconfigure", body, key=key)
            return reply["status"], reply.get("error", {}).get("code")

        assert (await status(org1, {"deviceId": 21}))[0] == 200
        assert (await status(mine, {"deviceId": 21}))[0] == 200
        assert await status(mine, {"deviceId": 22}) == (403, "not_device_owner")
        assert (await status(all_of_org, {"deviceId": 22}))[0] == 200
        assert await status(no_provision, {"deviceId": 21}) == (403, "missing_permission")
        assert await status(no_view, {"deviceId": 21}) == (403, "missing_permission")
        assert await status(read_only, {"deviceId": 21}) == (403, "missing_scope")
        # Another organisation's device and a device that does not exist look the same.
        assert await status(org1, {"deviceId": 31}) == (404, "device_not_found")
        assert await status(org1, {"deviceId": 9999}) == (404, "device_not_found")
        # Out of the int32 range is a malformed id, the same 400 as on every operation.
        assert await status(org1, {"deviceId": 2**70}) == (400, "invalid_field")
        assert await status(org1, {"deviceId": 23}) == (409, "device_not_active")
        assert (await status(org1, {"deviceId": 0}))[0] == 400
        assert (await status(org1, {"deviceId": "21"}))[0] == 400
        assert (await status(org1, {}))[0] == 400
        assert (await status(org1, {"deviceId": 21, "x": 1}))[0] == 400
        # No key, never a 500.
        reply = await rpc.call("provision/reconfigure", {"deviceId": 21})
        assert reply["status"] == 401
    assert rows(config, "SELECT COUNT(*) FROM commands WHERE device_id IN (23, 31)") == [(0,)]


async def test_repeated_request_gets_the_first_reply_and_one_command(config: Config) -> None:
    seed_devices(config, [16])
    key = org_key(config)
    async with running(config), RpcClient(config) as rpc:
        corr = uuid.uuid4().bytes
        first = await rpc.call("provision/reconfigure", {"deviceId": 16}, key=key, correlation=corr)
        again = await rpc.call("provision/reconfigure", {"deviceId": 16}, key=key, correlation=corr)
        assert first == again and first["status"] == 200
    assert rows(config, "SELECT COUNT(*) FROM commands WHERE device_id = 16") == [(1,)]


async def test_ack_from_another_device_or_garbage_changes_nothing(config: Config) -> None:
    seed_devices(config, [17, 18])
    key = org_key(config)
    async with (
        running(config) as server,
        RpcClient(config) as rpc,
        FakeDevice(config, 17) as device,
        FakeDevice(config, 18) as other,
    ):
        await online(server, device)
        reply = await rpc.call("provision/reconfigure", {"deviceId": 17}, key=key)
        command_id = reply["body"]["commandId"]
        await device.got.wait_for("/commands/reconfigure")
        await eventually(lambda: command_row(config, command_id)[0] == "sent")
        await other.ack(command_id)
        prefix = f"{config.mqtt.topic_prefix}/devices/17/commands/ack"
        for junk in (b"", b"{", b"[]", b'{"id": 5}', b'{"id": "cmd_x"}', b"x" * 10_000):
            await device.client.publish(prefix, junk, qos=1)
        app = server.app
        assert app is not None
        await eventually(lambda: app.counters["commands.ack.malformed"] == 6)
        await eventually(lambda: app.counters["commands.ack.unknown"] == 1)
        assert command_row(config, command_id)[0] == "sent"
        await device.ack(command_id, "done")
        await eventually(lambda: command_row(config, command_id)[0] == "acked")
        assert json.loads(command_row(config, command_id)[4]) == "done"


async def test_device_online_only_over_ble_is_not_offline_but_command_waits_for_mqtt(
    config: Config,
) -> None:
    async with daemon_and_device(config, 19) as (server, rpc, device, key):
        service: Presence = server.app.services.get(PRESENCE)
        service.set_channel(19, "ble", True)
        reply = await rpc.call("provision/reconfigure", {"deviceId": 19}, key=key)
        assert reply["body"]["deviceIsOffline"] is False
        await asyncio.sleep(0.5)
        assert device.commands == []
        await device.heartbeat()
        cmd, _ = await device.got.wait_for("/commands/reconfigure")
        assert cmd["id"] == reply["body"]["commandId"]
