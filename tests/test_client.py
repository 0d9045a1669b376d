"""`provisiond.client` against the real daemon and a real mosquitto."""

from __future__ import annotations

import asyncio
import inspect
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from provision_support import ALL_SCOPES, count, device_public_key, org_key
from pydantic import BaseModel
from structlog.testing import LogCapture

from provisiond.asyncapi import build_app
from provisiond.client import (
    OPERATIONS,
    CallTimeout,
    ProvisiondClient,
    RpcError,
)
from provisiond.config import Config
from provisiond.server import Server
from provisiond_ble.plugin import UploadBody
from support import Broker, make_config, remember_secret, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

# Operations plugins register when they start; the client covers the BLE bridge's.
PLUGIN_BODIES: dict[str, type[BaseModel]] = {"wifi-config/upload": UploadBody}


def client_for(config: Config, key: str | None, **kwargs: Any) -> ProvisiondClient:
    return ProvisiondClient(
        "127.0.0.1", config.mqtt.port, key=key, prefix=config.mqtt.topic_prefix, **kwargs
    )


def test_methods_match_the_routers_operations_and_schemas() -> None:
    _app, router = build_app()
    bodies: dict[str, type[BaseModel]] = {
        name: op.body for name, op in router.operations.items()
    } | PLUGIN_BODIES
    assert sorted(OPERATIONS) == sorted(bodies)
    for name, (method_name, fields) in OPERATIONS.items():
        method = getattr(ProvisiondClient, method_name)
        params = {
            p.name: p for p in inspect.signature(method).parameters.values() if p.name != "self"
        }
        assert sorted(params) == sorted(fields), name
        model_fields = bodies[name].model_fields
        assert sorted(fields.values()) == sorted(model_fields), name
        for param, field_name in fields.items():
            required = params[param].default is inspect.Parameter.empty
            assert required == model_fields[field_name].is_required(), (name, param)


async def _every_operation(client: ProvisiondClient, config: Config) -> None:
    who = await client.keys_whoami()
    assert who["org_id"] == 1 and "provision:write" in who["scopes"]
    stats = await client.daemon_stats()
    assert stats["connected"] is True
    assert (await client.wifi_config_keys())["keys"]

    created = await client.provision_token(org_id=1, owner_id=10)
    device_id = created["deviceId"]
    token = remember_secret(created["token"])
    activated = await client.device_activate(
        token=token, capabilities=0x02, public_key=device_public_key(), firmware_version="1.0"
    )
    assert activated["deviceId"] == device_id and activated["grant_verification_keys"]

    grant = await client.wifi_config_grant(device_id=device_id, expires_in_seconds=120)
    assert grant["grant_blob"].count(".") == 2
    remember_secret(grant["session_key"])  # server-generated mode: no app_public_key
    assert (await client.device_get(device_id))["state"] == "active"
    listed = await client.device_list(limit=50)
    assert device_id in [d["deviceId"] for d in listed["devices"]]
    again = await client.provision_reprovision_token(device_id)
    remember_secret(again["token"])
    assert again["deviceId"] == device_id
    queued = await client.provision_reconfigure(device_id)
    assert queued["commandId"].startswith("cmd_") and isinstance(queued["deviceIsOffline"], bool)
    gone = await client.device_decommission(device_id)
    assert gone == {"deviceId": device_id, "state": "decommissioned"}
    assert (await client.device_get(device_id))["state"] == "decommissioned"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_every_operation(config: Config, daemon: Server, protocol: Any) -> None:
    key = org_key(config)
    async with client_for(config, key, protocol=protocol) as client:
        await _every_operation(client, config)
        assert client.discarded == 0


async def test_error_reply_raises_with_status_code_and_field(
    config: Config, daemon: Server
) -> None:
    key = org_key(config)
    async with client_for(config, key) as client:
        with pytest.raises(RpcError) as caught:
            await client.device_get(999_999)
        assert caught.value.status == 404 and caught.value.code == "device_not_found"
        with pytest.raises(RpcError) as caught:
            await client.provision_token(org_id=1, owner_id=0)
        assert (caught.value.status, caught.value.field) == (400, "ownerId")
        assert "400" in str(caught.value) and key not in str(caught.value)
    async with client_for(config, "sk_live_" + "x" * 40) as client:
        with pytest.raises(RpcError) as caught:
            await client.keys_whoami()
        assert caught.value.status == 401


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_retry_is_a_replay(
    tmp_path: Path, broker: Broker, logs: LogCapture, protocol: Any
) -> None:
    """The first attempt goes unanswered (daemon down, its session keeps the
    request); the retry carries the same correlation data, so when the daemon
    comes back it answers both copies with one device created, and the client
    takes one reply and discards the other."""
    config = make_config(tmp_path, broker)
    key = org_key(config)
    async with running(config):
        pass  # makes the daemon's persistent session on the broker
    async with client_for(config, key, timeout=20, retries=9, protocol=protocol) as client:
        call = asyncio.create_task(client.provision_token(org_id=1, owner_id=10))
        await asyncio.sleep(5)  # two or three attempts, all held by the broker
        assert not call.done()
        async with running(config):
            created = await asyncio.wait_for(call, 20)
            remember_secret(created["token"])
            await asyncio.sleep(1)  # the later copies' replies arrive too
        assert client.discarded >= 1
    assert count(config, "devices") == 1
    rpc_lines = [
        e for e in logs.entries if e.get("event") == "rpc" and e["op"] == "provision/token"
    ]
    assert len(rpc_lines) >= 2 and all(e["status"] == 200 for e in rpc_lines)
    assert sum(1 for e in rpc_lines if e.get("replay")) == len(rpc_lines) - 1


async def test_concurrent_calls_each_get_their_own_reply(config: Config, daemon: Server) -> None:
    key = org_key(config, users=(10, 11, 12))
    async with client_for(config, key) as client:
        owners = [10, 11, 12] * 7
        created = await asyncio.gather(
            *(client.provision_token(org_id=1, owner_id=o) for o in owners)
        )
        for reply in created:
            remember_secret(reply["token"])
        devices = await asyncio.gather(*(client.device_get(r["deviceId"]) for r in created))
    assert [d["ownerId"] for d in devices] == owners
    assert len({r["deviceId"] for r in created}) == len(owners)


async def test_unsolicited_replies_are_discarded(config: Config, daemon: Server) -> None:
    key = org_key(config)
    async with (
        client_for(config, key) as client,
        aiomqtt.Client(
            "127.0.0.1", config.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as stranger,
    ):
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = secrets.token_bytes(16)
        forged = json.dumps({"status": 200, "body": {"key_id": "forged"}})
        await stranger.publish(client.reply_topic, forged, qos=1, properties=props)
        await stranger.publish(client.reply_topic, b"not json", qos=1)
        who = await client.keys_whoami()
        assert who["key_id"] != "forged"
        await asyncio.sleep(0.3)
        assert client.discarded == 2


async def test_timeout_after_retries(config: Config, daemon: Server) -> None:
    key = org_key(config)
    nobody = ProvisiondClient(
        "127.0.0.1", config.mqtt.port, key=key, prefix=f"nobody-{uuid.uuid4().hex[:6]}"
    )
    async with nobody as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(CallTimeout) as caught:
            await client.request("keys/whoami", timeout=1.5, retries=2)
        assert caught.value.attempts == 3
        assert 1.4 < loop.time() - started < 5


async def test_ble_upload_through_the_client(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    from ble_support import PASSWORD, SSID
    from test_ble_bridge import ble_env

    async with ble_env(tmp_path, broker) as env:
        dev = await env.device()
        _id, key = seed_key(env.server.config, org=1, scopes=ALL_SCOPES)
        async with client_for(env.server.config, key) as client:
            body = await client.wifi_config_upload(dev.device_id, ssid=SSID, password=PASSWORD)
        assert body["state"] == "connected" and body["attempts"] == 1


def test_the_client_needs_only_aiomqtt_and_paho() -> None:
    """The `client` extra is enough: importing the client loads nothing else of
    the daemon's dependencies, nor any other provisiond module."""
    import tomllib

    from daemon_proc import ROOT, python_c

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extra["optional-dependencies"]["client"] == ["aiomqtt>=2.3,<3", "paho-mqtt>=2.1,<3"]
    code = (
        "import sys; import provisiond.client; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))"
    )
    out = python_c(code, ROOT / "daemon").split()
    allowed = {"aiomqtt", "paho", "provisiond", "typing_extensions", "__main__", "_distutils_hack"}
    assert set(out) <= allowed, out
    loaded = python_c(
        "import sys, provisiond.client; print(sorted(m for m in sys.modules if m.startswith('provisiond')))",
        ROOT / "daemon",
    ).strip()
    assert loaded == "['provisiond', 'provisiond.client']"
