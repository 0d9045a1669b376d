"""Devices' own broker accounts, against the real mosquitto with the dynamic-security plugin.

The broker runs the shipped config/mosquitto/ (see dynsec_support.py). The
daemon manages device accounts through the plugin; devices connect with the
credentials their provision reply carried, and the broker — not the daemon —
refuses everything their role does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dynsec_support import (
    PASSWORDS,
    PREFIX,
    DynsecBroker,
    ServiceRpc,
    device_call,
    remember_password,
)
from provision_support import count, device_public_key, org_key, rows
from structlog.testing import LogCapture

from provisiond import mqtt
from provisiond.broker_accounts import BrokerAccountsUnavailable
from provisiond.broker_accounts.dynsec import DynsecClient, MosquittoDynsec
from provisiond.config import Config
from provisiond.presence import PRESENCE
from support import (
    Broker,
    eventually,
    make_config,
    open_db,
    remember_secret,
    running,
    store_toml,
)

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store


@pytest.fixture
def dynsec(tmp_path: Path) -> Iterator[DynsecBroker]:
    broker = DynsecBroker(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


async def provision(rpc: ServiceRpc, key: str) -> dict[str, Any]:
    reply = await rpc.call("provision/token", {"orgId": 1, "ownerId": 10}, key=key)
    assert reply["status"] == 200, reply
    body: dict[str, Any] = reply["body"]
    remember_secret(body["token"])
    remember_password(body["mqtt"]["password"])
    return body


def activation(token: str) -> dict[str, Any]:
    return {"token": token, "capabilities": 2, "public_key": device_public_key()}


async def activated_device(
    dynsec: DynsecBroker, rpc: ServiceRpc, key: str
) -> tuple[dict[str, Any], mqtt.Client]:
    """A provisioned, activated device, still connected (caller disconnects)."""
    body = await provision(rpc, key)
    device = dynsec.device(body["mqtt"])
    await device.connect()
    reply = await device_call(
        device, body["deviceId"], "device/activate", activation(body["token"])
    )
    assert reply["status"] == 200, reply
    return body, device


async def refused_publish(client: mqtt.Client, topic: str, payload: bytes = b"{}") -> None:
    with pytest.raises(mqtt.PublishRefused) as refused:
        await client.publish(topic, payload, qos=1)
    assert refused.value.reason_code == 0x87  # not authorized


async def refused_subscribe(client: mqtt.Client, topic: str) -> None:
    granted = await client.subscribe(topic, qos=1)
    assert granted == [0x87], f"{topic}: {granted}"


# --- end to end


async def test_a_provisioned_device_connects_with_its_own_credentials_and_works(
    dynsec: DynsecBroker, tmp_path: Path, logs: LogCapture
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config) as server, ServiceRpc(config) as rpc:
        body = await provision(rpc, key)
        device_id, creds = body["deviceId"], body["mqtt"]
        assert creds["username"] == f"device-{device_id}"
        assert (creds["host"], creds["port"], creds["tls_port"]) == (
            "localhost",
            dynsec.local_port,
            dynsec.tls_port,
        )
        assert len(creds["password"]) >= 32  # 24 random bytes, base64url: 192 bits
        # The broker keeps a salted hash, never the password.
        stored = dynsec.stored_clients()[creds["username"]]
        assert stored["salt"] and stored["password"] != creds["password"]
        assert creds["password"] not in dynsec.state.read_text()

        async with dynsec.device(creds, tls=True) as device:
            reply = await device_call(
                device, device_id, "device/activate", activation(body["token"])
            )
            assert reply["status"] == 200, reply
            # The same connection, now under the active role (no reconnect needed).
            own = f"{PREFIX}/devices/{device_id}"
            assert await device.subscribe(f"{own}/commands/#", qos=1) == [1]
            await device.publish(f"{own}/heartbeat", b'{"uptime": 1}', qos=1)

            async def online() -> bool:
                got = await rpc.call("device/get", {"deviceId": device_id}, key=key)
                return bool((got["body"].get("presence") or {}).get("online"))

            for _ in range(100):
                if await online():
                    break
                await asyncio.sleep(0.05)
            assert await online()

            queued = await rpc.call("provision/reconfigure", {"deviceId": device_id}, key=key)
            assert queued["status"] == 200, queued
            command_id = queued["body"]["commandId"]
            async with asyncio.timeout(10):
                async for message in device.messages():
                    device.ack(message)
                    if message.topic == f"{own}/commands/reconfigure":
                        assert json.loads(message.payload)["id"] == command_id
                        break
            await device.publish(
                f"{own}/commands/ack", json.dumps({"id": command_id}).encode(), qos=1
            )
            await eventually(
                lambda: (
                    rows(config, "SELECT state FROM commands WHERE id = ?", (command_id,))
                    == [("acked",)]
                )
            )

            grant = await rpc.call("wifi-config/grant", {"device_id": device_id}, key=key)
            assert grant["status"] == 200, grant
            grant_id = next(
                e["grant_id"]
                for e in logs.entries
                if e["event"] == "rpc" and e.get("op") == "wifi-config/grant"
            )
            await device.publish(
                f"{own}/wifi/status",
                json.dumps({"grant_id": grant_id, "state": "connected"}).encode(),
                qos=1,
            )
            assert server.app is not None
            counters = server.app.counters
            await eventually(lambda: counters["wifi.status.connected"] == 1)


# --- refusals by the broker, each its own test


async def test_broker_refuses_another_devices_heartbeat(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        first, device1 = await activated_device(dynsec, rpc, key)
        second, device2 = await activated_device(dynsec, rpc, key)
        await refused_publish(device2, f"{PREFIX}/devices/{first['deviceId']}/heartbeat")
        await device2.publish(f"{PREFIX}/devices/{second['deviceId']}/heartbeat", b"{}", qos=1)
        await device1.disconnect()
        await device2.disconnect()


async def test_broker_refuses_reading_another_devices_commands(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        first, device1 = await activated_device(dynsec, rpc, key)
        _second, device2 = await activated_device(dynsec, rpc, key)
        await refused_subscribe(device2, f"{PREFIX}/devices/{first['deviceId']}/commands/#")
        await refused_subscribe(device2, f"{PREFIX}/devices/+/commands/#")
        await device1.disconnect()
        await device2.disconnect()


async def test_broker_refuses_a_device_calling_provision_token(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        _body, device = await activated_device(dynsec, rpc, key)
        await refused_publish(device, f"{PREFIX}/rpc/provision/token")
        await device.disconnect()


async def test_broker_refuses_a_device_subscribing_to_everything_or_a_share_group(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        body, device = await activated_device(dynsec, rpc, key)
        own = f"{PREFIX}/devices/{body['deviceId']}"
        await refused_subscribe(device, "#")
        await refused_subscribe(device, f"$share/provisiond/{PREFIX}/rpc/#")
        # Not even a share group on its own topics.
        await refused_subscribe(device, f"$share/g/{own}/commands/#")
        await device.disconnect()


async def test_a_service_account_cannot_join_a_share_group(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    async with (
        ServiceRpc(dynsec.config(tmp_path)) as rpc,
    ):
        granted = await rpc.client.subscribe(f"$share/provisiond/{PREFIX}/rpc/#", qos=1)
        assert [getattr(code, "value", code) for code in granted] == [0x87]


async def test_before_activation_the_credentials_can_only_activate(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        body = await provision(rpc, key)
        device_id = body["deviceId"]
        own = f"{PREFIX}/devices/{device_id}"
        async with dynsec.device(body["mqtt"]) as device:
            for leaf in ("heartbeat", "status", "commands/ack", "wifi/status"):
                await refused_publish(device, f"{own}/{leaf}")
            await refused_publish(device, f"{PREFIX}/rpc/device/get")
            await refused_subscribe(device, f"{own}/commands/#")
            await refused_subscribe(device, f"{own}/presence")
            reply = await device_call(
                device, device_id, "device/activate", activation(body["token"])
            )
            assert reply["status"] == 200, reply
            # The active role: activating again is no longer its business.
            await refused_publish(device, f"{PREFIX}/rpc/device/activate")
            await device.publish(f"{own}/heartbeat", b"{}", qos=1)


# --- failures while provisioning


def _no_trace(config: Config, dynsec: DynsecBroker | None = None) -> None:
    assert count(config, "devices") == 0
    assert count(config, "provision_tokens") == 0
    assert count(config, "device_id_reservations") == 0
    if dynsec is not None:
        assert not [u for u in dynsec.stored_clients() if u.startswith("device-")]


async def test_the_plugin_refusing_gives_503_and_leaves_nothing(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc, dynsec.admin() as admin:
        # Take the daemon's admin role away (this also disconnects it; it reconnects).
        (done,) = await admin(
            {"command": "removeClientRole", "username": "provisiond", "rolename": "dynsec-admin"}
        )
        assert "error" not in done
        reply = await rpc.call("provision/token", {"orgId": 1, "ownerId": 10}, key=key)
        assert reply["status"] == 503, reply
        assert reply["error"]["code"] == "broker_refused"
        _no_trace(config, dynsec)

        (done,) = await admin(
            {"command": "addClientRole", "username": "provisiond", "rolename": "dynsec-admin"}
        )
        assert "error" not in done
        await asyncio.sleep(0.5)  # the daemon's reconnect after the role change
        body = await provision(rpc, key)
        assert body["mqtt"]["username"] in await admin.clients()


async def test_a_broker_without_the_plugin_gives_503_and_leaves_nothing(
    tmp_path: Path, own_broker: Broker
) -> None:
    """The commands go out but nobody answers them (the plugin is not loaded)."""
    config = make_config(
        tmp_path,
        own_broker,
        mqtt={"username": "provisiond"},
        broker_accounts={"backend": "mosquitto-dynsec", "timeout_seconds": 0.5},
    )
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        reply = await rpc.call("provision/token", {"orgId": 1, "ownerId": 10}, key=key)
        assert reply["status"] == 503, reply
        assert reply["error"]["code"] == "broker_accounts_unavailable"
        _no_trace(config)


async def test_an_unreachable_broker_is_unavailable_and_the_client_recovers(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    accounts = MosquittoDynsec(config, DynsecClient(config))
    try:
        await accounts.list_accounts()
        dynsec.stop()
        with pytest.raises(BrokerAccountsUnavailable) as down:
            await accounts.create(4242)
        assert down.value.status == 503
        assert "broker" in down.value.message
        dynsec.start()
        creds = await accounts.create(4242)
        remember_password(creds.password)
        assert "device-4242" in (await accounts.list_accounts()).clients
        assert "password" not in repr(creds) and creds.password not in repr(creds)
    finally:
        await accounts.close()


async def test_replays_return_the_identical_reply_with_the_same_password(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        first = await rpc.call(
            "provision/token", {"orgId": 1, "ownerId": 10}, key=key, correlation=b"same"
        )
        again = await rpc.call(
            "provision/token", {"orgId": 1, "ownerId": 10}, key=key, correlation=b"same"
        )
        assert first["status"] == 200 and again == first
        remember_password(first["body"]["mqtt"]["password"])
        assert count(config, "devices") == 1


# --- re-provision and decommission


async def test_reprovision_kills_the_old_password_and_the_new_one_works(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        body, device = await activated_device(dynsec, rpc, key)
        device_id = body["deviceId"]
        reply = await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=key)
        assert reply["status"] == 200, reply
        new = reply["body"]
        remember_secret(new["token"])
        remember_password(new["mqtt"]["password"])
        assert new["mqtt"]["username"] == body["mqtt"]["username"]
        assert new["mqtt"]["password"] != body["mqtt"]["password"]
        # The connected device was cut off, and its old password is refused.
        await eventually(lambda: not device.is_connected, timeout=2)
        with pytest.raises(mqtt.ConnectRefused):
            await dynsec.device(body["mqtt"]).connect()
        async with dynsec.device(new["mqtt"]) as again:
            # Pending again: only activation, until it re-activates.
            await refused_publish(again, f"{PREFIX}/devices/{device_id}/heartbeat")
            reply = await device_call(again, device_id, "device/activate", activation(new["token"]))
            assert reply["status"] == 200, reply
            await again.publish(f"{PREFIX}/devices/{device_id}/heartbeat", b"{}", qos=1)
        with pytest.raises(mqtt.ConnectRefused):
            await dynsec.device(body["mqtt"]).connect()


async def test_decommission_cuts_the_device_off_and_clears_its_traces(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config) as server, ServiceRpc(config) as rpc:
        body, device = await activated_device(dynsec, rpc, key)
        device_id = body["deviceId"]
        own = f"{PREFIX}/devices/{device_id}"
        await device.publish(f"{own}/heartbeat", b"{}", qos=1)
        # A retained presence message is there to be cleared.
        daemon_view = mqtt.Client(
            "127.0.0.1", dynsec.local_port, username="backend",
            password=PASSWORDS["backend"].encode(),
        )  # fmt: skip
        await daemon_view.connect()
        await daemon_view.subscribe(f"{own}/presence", qos=1)
        async with asyncio.timeout(5):
            async for message in daemon_view.messages():
                if message.retain and message.payload:
                    break
        await daemon_view.disconnect()
        # A command queued while it is offline, and a pending one for a second device.
        await device.disconnect()
        queued = await rpc.call("provision/reconfigure", {"deviceId": device_id}, key=key)
        assert queued["status"] == 200, queued
        pending = await provision(rpc, key)

        connected = dynsec.device(body["mqtt"])
        await connected.connect()
        reply = await rpc.call("device/decommission", {"deviceId": device_id}, key=key)
        assert reply == {"status": 200, "body": {"deviceId": device_id, "state": "decommissioned"}}
        await eventually(lambda: not connected.is_connected, timeout=1)
        with pytest.raises(mqtt.ConnectRefused):
            await dynsec.device(body["mqtt"]).connect()
        got = await rpc.call("device/get", {"deviceId": device_id}, key=key)
        assert got["body"]["state"] == "decommissioned"
        assert got["body"].get("presence") is None
        assert rows(config, "SELECT state FROM commands WHERE device_id = ?", (device_id,)) == [
            ("dropped",)
        ]
        assert count(config, "presence") == 0 or not rows(
            config, "SELECT 1 FROM presence WHERE device_id = ?", (device_id,)
        )
        assert server.app is not None
        assert server.app.services.get(PRESENCE).presence_of(device_id) is None
        # No retained presence left: a new subscriber gets nothing.
        view = mqtt.Client(
            "127.0.0.1", dynsec.local_port, username="backend",
            password=PASSWORDS["backend"].encode(),
        )  # fmt: skip
        async with view:
            await view.subscribe(f"{own}/presence", qos=1)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for message in view.messages():
                        raise AssertionError(f"retained presence left: {message.payload!r}")

        # The second device's unspent token dies with its decommission.
        reply = await rpc.call("device/decommission", {"deviceId": pending["deviceId"]}, key=key)
        assert reply["status"] == 200
        gone = await rpc.call("device/activate", activation(pending["token"]))
        assert gone["status"] == 410, gone
        # Twice is the same.
        again = await rpc.call("device/decommission", {"deviceId": device_id}, key=key)
        assert again == reply | {"body": {"deviceId": device_id, "state": "decommissioned"}}

        # Re-provision brings it back, with a new account.
        back = await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=key)
        assert back["status"] == 200, back
        remember_secret(back["body"]["token"])
        remember_password(back["body"]["mqtt"]["password"])
        got = await rpc.call("device/get", {"deviceId": device_id}, key=key)
        assert got["body"]["state"] == "pending"
        async with dynsec.device(back["body"]["mqtt"]) as returned:
            reply = await device_call(
                returned, device_id, "device/activate", activation(back["body"]["token"])
            )
            assert reply["status"] == 200, reply


# --- sync


def cli_config_file(dynsec: DynsecBroker, config: Config, tmp_path: Path) -> Path:
    """The daemon's settings as a config file, for a CLI command to read."""
    config_file = tmp_path / "provisiond.toml"
    config_file.write_text(
        f"""
[mqtt]
port = {dynsec.local_port}
topic_prefix = "{PREFIX}"
username = "provisiond"
password_file = "{tmp_path / "mqtt-password"}"
[broker_accounts]
backend = "mosquitto-dynsec"
{store_toml(config)}"""
    )
    return config_file


async def test_sync_reports_drift_and_fixes_it_only_with_apply(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    from provisiond.cli.main import main as cli_main

    config = dynsec.config(tmp_path, broker_accounts={"sync_at_start": False})
    key = org_key(config)
    config_file = cli_config_file(dynsec, config, tmp_path)
    async with running(config), ServiceRpc(config) as rpc:
        kept = await provision(rpc, key)
        lost = await provision(rpc, key)
    async with dynsec.admin() as admin:
        await admin(
            {"command": "deleteClient", "username": lost["mqtt"]["username"]},
            {"command": "createClient", "username": "device-99999"},
            {"command": "createClient", "username": "device-notours"},
        )

        async def sync(*extra: str) -> int:
            return await asyncio.to_thread(
                cli_main, ["broker-accounts", "sync", "-c", str(config_file), *extra]
            )

        assert await sync() == 0
        clients = await admin.clients()
        assert "device-99999" in clients and lost["mqtt"]["username"] not in clients
        assert await sync("--apply") == 0
        clients = await admin.clients()
        assert "device-99999" not in clients
        assert "device-notours" in clients  # not a device account name: never touched
        assert {kept["mqtt"]["username"], lost["mqtt"]["username"]} <= clients
        # Re-made without a password: it cannot log in until a re-provision.
        assert "password" not in dynsec.stored_clients()[lost["mqtt"]["username"]]


async def test_the_daemon_syncs_at_start_and_logs_what_it_changed(
    dynsec: DynsecBroker, tmp_path: Path, logs: LogCapture
) -> None:
    config = dynsec.config(tmp_path)
    async with dynsec.admin() as admin:
        await admin({"command": "createClient", "username": "device-777"})
        async with running(config):
            # Wait for the line itself: it comes once the whole plan is applied,
            # after the account is gone from the broker's file (stopping the
            # daemon on seeing only that could cut the sync short).
            await eventually(
                lambda: any(e["event"] == "broker_accounts.synced" for e in logs.entries)
            )
        assert "device-777" not in dynsec.stored_clients()
        synced = [e for e in logs.entries if e["event"] == "broker_accounts.synced"]
        assert synced[0]["deleted_names"] == ["device-777"]


# --- what mosquitto 2.0 supports


async def test_dynsec_acls_have_no_username_patterns(dynsec: DynsecBroker) -> None:
    """Why there is one role per device: a `%u` ACL is matched literally on 2.0."""
    async with dynsec.admin() as admin:
        await admin(
            {
                "command": "createRole",
                "rolename": "pattern",
                "acls": [
                    {"acltype": "publishClientSend", "topic": "x/%u/hb", "allow": True},
                ],
            },
            {
                "command": "createClient",
                "username": "patterned",
                "password": remember_password("patterned-pw-123"),
                "roles": [{"rolename": "pattern"}],
            },
        )
        creds = {"username": "patterned", "password": "patterned-pw-123", "port": dynsec.local_port}
        async with dynsec.device(creds) as client:
            await refused_publish(client, "x/patterned/hb")


# --- no password anywhere it must not be (see also leakcheck.py: logs, events, store files)


async def test_no_device_password_in_retained_messages_or_the_brokers_file(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    config = dynsec.config(tmp_path)
    key = org_key(config)
    async with running(config), ServiceRpc(config) as rpc:
        body, device = await activated_device(dynsec, rpc, key)
        await device.publish(f"{PREFIX}/devices/{body['deviceId']}/heartbeat", b"{}", qos=1)
        await device.disconnect()
        password = body["mqtt"]["password"].encode()
        await asyncio.sleep(0.3)
        # Everything retained under the prefix, read as the daemon's own account.
        reader = mqtt.Client(
            "127.0.0.1",
            dynsec.local_port,
            username="provisiond",
            password=PASSWORDS["provisiond"].encode(),
            client_id="retained-reader",
        )
        retained: list[bytes] = []
        async with reader:
            await reader.subscribe(f"{PREFIX}/#", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for message in reader.messages():
                        reader.ack(message)
                        if message.retain:
                            retained.append(message.topic.encode() + b" " + message.payload)
        assert retained  # at least the daemon status and the device's presence
        assert not [r for r in retained if password in r]
        assert password not in dynsec.state.read_bytes()


async def test_cli_decommission_asks_the_running_daemon(
    dynsec: DynsecBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisiond.cli.main import main as cli_main

    config = dynsec.config(tmp_path)
    key = org_key(config)
    config_file = cli_config_file(dynsec, config, tmp_path)
    async with running(config), ServiceRpc(config) as rpc:
        body, device = await activated_device(dynsec, rpc, key)
        argv = ["devices", "decommission", str(body["deviceId"]), "-c", str(config_file)]
        assert await asyncio.to_thread(cli_main, [*argv, "--key", key]) == 0
        assert "decommissioned" in capsys.readouterr().out
        await eventually(lambda: not device.is_connected, timeout=1)
        got = await rpc.call("device/get", {"deviceId": body["deviceId"]}, key=key)
        assert got["body"]["state"] == "decommissioned"
        # Without a key it says what it needs, and changes nothing.
        assert await asyncio.to_thread(cli_main, argv) == 1
        assert "provision:write" in capsys.readouterr().err


async def test_a_crash_between_account_and_commit_leaves_only_what_sync_removes(
    dynsec: DynsecBroker, tmp_path: Path
) -> None:
    """The id reserved and the account made, then the process dies before the
    commit: no device row, no token; sync spares the account while the
    reservation is young (a request in flight) and removes it once stale."""
    from provisiond.broker_accounts import store as account_store
    from provisiond.broker_accounts.sync import sync
    from provisiond.store import transaction

    config = dynsec.config(tmp_path)
    db = open_db(config)  # the store under test, migrated
    with transaction(db):
        device_id = account_store.reserve_device_id(db, now=1000.0)
    accounts = MosquittoDynsec(config, DynsecClient(config))

    async def store_call(fn: Any) -> Any:
        return fn(db)

    try:
        creds = await accounts.create(device_id)
        remember_password(creds.password)
        # ... and here the daemon is killed.
        assert count(config, "devices") == 0 and count(config, "provision_tokens") == 0
        young = await sync(accounts, store_call, prefix="device-", now=1010.0, apply=True)
        assert young.plan.empty
        assert creds.username in (await accounts.list_accounts()).clients
        stale = await sync(accounts, store_call, prefix="device-", now=2000.0, apply=True)
        assert stale.plan.delete_clients == [creds.username]
        assert stale.plan.delete_roles == [creds.username]
        listed = await accounts.list_accounts()
        assert creds.username not in listed.clients and creds.username not in listed.roles
        assert count(config, "device_id_reservations") == 0
        # The id is never handed out again.
        with transaction(db):
            assert account_store.reserve_device_id(db, now=2001.0) == device_id + 1
    finally:
        await accounts.close()
        db.conn.close()


# --- the optional certificate path


def _csr(cn: str = "anything", curve: Any = None) -> tuple[Any, str]:
    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(curve or ec.SECP256R1())
    csr = (
        cx509.CertificateSigningRequestBuilder()
        .subject_name(cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_a_csr_activation_yields_a_certificate_mosquitto_accepts_until_decommission(
    tmp_path: Path,
) -> None:
    import signal

    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from provisiond.broker_accounts.certificates import DeviceCA

    ca_dir = tmp_path / "device_ca"
    # The CA exists before the broker starts (as on a gateway after the
    # daemon's first start): mosquitto loads its certificate and CRL.
    ca = DeviceCA.load_or_create(ca_dir, name="test device CA")
    ca.write_crl([])
    dynsec = DynsecBroker(tmp_path / "mosquitto", device_ca=ca_dir).start()
    try:
        config = dynsec.config(
            tmp_path, broker_accounts={"certificates": True, "device_ca_dir": str(ca_dir)}
        )
        key = org_key(config)
        async with running(config), ServiceRpc(config) as rpc:
            body = await provision(rpc, key)
            device_id = body["deviceId"]
            async with dynsec.device(body["mqtt"]) as device:
                _, bad = _csr(curve=ec.SECP384R1())
                refused = await device_call(
                    device, device_id, "device/activate", activation(body["token"]) | {"csr": bad}
                )
                assert refused["status"] == 400 and refused["error"]["code"] == "invalid_csr"
                private, csr = _csr("i-would-like-to-be-someone-else")
                reply = await device_call(
                    device, device_id, "device/activate", activation(body["token"]) | {"csr": csr}
                )
            assert reply["status"] == 200, reply
            cert = cx509.load_pem_x509_certificate(reply["body"]["certificate"].encode())
            assert cert.subject.rfc4514_string() == f"CN=device-{device_id}"
            assert reply["body"]["ca_certificate"] == ca.cert_pem
            (tmp_path / "dev.crt").write_text(reply["body"]["certificate"])
            (tmp_path / "dev.key").write_bytes(
                private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

            def cert_client() -> mqtt.Client:
                ctx = dynsec.tls_context()
                ctx.load_cert_chain(tmp_path / "dev.crt", tmp_path / "dev.key")
                return mqtt.Client(
                    "localhost", dynsec.cert_port, client_id=f"cert-{device_id}", tls=ctx,
                    connect_timeout=5,
                )  # fmt: skip

            own = f"{PREFIX}/devices/{device_id}"
            async with cert_client() as by_cert:
                # Logged in as device-N by its certificate, under its active role.
                await by_cert.publish(f"{own}/heartbeat", b"{}", qos=1)
                await refused_publish(by_cert, f"{PREFIX}/devices/{device_id + 1}/heartbeat")
                await refused_publish(by_cert, f"{PREFIX}/rpc/provision/token")

                connected = cert_client()
                await connected.connect()
                reply = await rpc.call("device/decommission", {"deviceId": device_id}, key=key)
                assert reply["status"] == 200
                # The account is gone: the connected device is cut off at once.
                await eventually(lambda: not connected.is_connected, timeout=1)
            crl = cx509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
            assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
            # The documented step: mosquitto reads the CRL again on reload.
            assert dynsec.proc is not None
            dynsec.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            with pytest.raises(mqtt.MqttError, match="revoked"):
                await cert_client().connect()
    finally:
        dynsec.stop()
