"""WiFi grants through the running daemon over a real mosquitto (docs/protocol.md §1, §2, §7)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from structlog.testing import LogCapture

import support
from provisiond.clock import Clock
from provisiond.config import Config
from provisiond.server import Server
from provisiond.store import transaction
from provisiond.wifi.crypto import b64url_decode, b64url_encode
from provisiond.wifi.jws import GrantRejected, parse_unverified
from provisiond.wifi.service import GRANTS, GrantService
from provisiond.wifi.uploader import Uploader
from provisiond_sim.reference import ReferenceDevice
from support import Broker, RpcClient, eventually, make_config, open_db, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

SSID, PASSWORD = "lab-net", "Tr0ub4dor&3-horse"
WIFI = 0x02


# --------------------------------------------------------------------------- helpers


def seed_device(
    config: Config,
    *,
    org: int = 1,
    owner: int = 1,
    capabilities: int = 0x03,
    public_key: bytes | None = None,
    active: bool = True,
) -> int:
    """Insert a device straight into SQLite, as activation would leave it."""
    seed_key(config, org=org, users=(owner,))  # creates org, owner and the schema
    db = open_db(config)
    now = time.time()
    cur = db.execute(
        "INSERT INTO devices (org_id, owner_id, state, capabilities, public_key, created_at,"
        " activated_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        [
            org,
            owner,
            "active" if active else "pending",
            capabilities if active else 0,
            public_key if active else None,
            now,
            now if active else None,
        ],
    )
    device_id = int(cur.fetchone()[0])
    db.conn.close()
    return device_id


class Dev:
    """A reference device with its X25519 key, seeded as an activated device."""

    def __init__(self, config: Config, *, org: int = 1, owner: int = 1, caps: int = 0x03) -> None:
        self.private = X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes_raw()
        self.id = seed_device(
            config, org=org, owner=owner, capabilities=caps, public_key=self.public
        )

    def reference(self, jwks: list[dict[str, Any]], **kw: Any) -> ReferenceDevice:
        return ReferenceDevice(self.id, self.private, jwks, **kw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def spellings(secret: bytes) -> list[str]:
    """The ways a leaked secret could show up in text."""
    return [
        secret.hex(),
        b64url_encode(secret),
        base64.b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    ]


def assert_absent(text: str, secrets: list[bytes], words: list[str] = ()) -> None:  # type: ignore[assignment]
    for secret in secrets:
        for spelled in spellings(secret):
            assert spelled not in text, "a secret leaked"
    for word in words:
        assert word not in text, "a secret leaked"


def logs_text(logs: LogCapture) -> str:
    return "\n".join(repr(e) for e in logs.entries)


def signing_pems(server: Server) -> list[bytes]:
    ring = grants(server).keyring
    assert ring is not None
    return [k.pem() for k in ring.keys]


def grants(server: Server) -> GrantService:
    assert server.app is not None
    service = server.app.services.get(GRANTS)
    assert isinstance(service, GrantService)
    return service


async def complete_upload(device: ReferenceDevice, up: Uploader, blob: str) -> None:
    """The BLE part, in-process: grant, credentials, status, both ends agreeing."""
    device.accept_grant(blob)
    assert device._session is not None
    assert device._session.keys.raw == up.session_keys.raw, "both ends derive the same K_session"
    assert up.read_status(device.status_message())["state"] == "grant-accepted"
    creds = device.receive_credentials(up.credential_message(SSID, PASSWORD))
    assert (creds.ssid, creds.password, creds.security) == (SSID, PASSWORD, "wpa2-psk")
    assert up.read_status(device.finish(True)) == {"state": "connected", "grant_id": up.grant_id}


def Events(config: Config) -> support.Events:
    return support.Events(config, "wifi/#")


async def publish_status(config: Config, device_id: int, payload: Any) -> None:
    async with aiomqtt.Client("127.0.0.1", config.mqtt.port) as client:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await client.publish(
            f"{config.mqtt.topic_prefix}/devices/{device_id}/wifi/status", data, qos=1
        )


def consumed_row(config: Config, jti: str) -> tuple[Any, ...] | None:
    db = open_db(config)
    try:
        row = db.execute(
            "SELECT device_id, exp, state FROM consumed_grants WHERE jti = ?", [jti]
        ).fetchone()
        return None if row is None else tuple(row)
    finally:
        db.conn.close()


# --------------------------------------------------------------------------- the three modes


async def test_server_generated_mode_over_broker(
    config: Config, daemon: Server, rpc: RpcClient, logs: LogCapture
) -> None:
    _, secret = seed_key(config, scopes=("devices:write", "devices:read"))
    dev = Dev(config)
    keys = await rpc.call("wifi-config/keys", key=secret)
    assert keys["status"] == 200 and len(keys["body"]["keys"]) == 1
    assert keys["body"]["keys"][0]["kty"] == "OKP" and "d" not in keys["body"]["keys"][0]

    reply = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=secret)
    assert reply["status"] == 200, reply
    body = reply["body"]
    assert set(body) == {"grant_blob", "expires_at", "device_public_key", "session_key"}
    assert b64url_decode(body["device_public_key"]) == dev.public
    session_key = b64url_decode(body["session_key"])
    assert len(session_key) == 64

    device = dev.reference(keys["body"]["keys"])
    up = Uploader.for_grant(body["grant_blob"], session_key=session_key)
    await complete_upload(device, up, body["grant_blob"])

    await eventually(lambda: any(e.get("op") == "wifi-config/grant" for e in logs.entries))
    line = next(e for e in logs.entries if e.get("op") == "wifi-config/grant")
    assert line["status"] == 200 and line["device"] == dev.id and line["mode"] == "server"
    # The reply is the one place the session key may appear, and only in this mode.
    assert_absent(
        logs_text(logs),
        [session_key, private_bytes(dev.private), *signing_pems(daemon)],
        [PASSWORD, body["grant_blob"]],
    )


async def test_end_to_end_mode_daemon_never_sees_session_key(
    config: Config, daemon: Server, rpc: RpcClient, logs: LogCapture
) -> None:
    _, secret = seed_key(config, scopes=("devices:write", "devices:read"))
    dev = Dev(config)
    e = X25519PrivateKey.generate()  # the app's; only its public half travels
    reply = await rpc.call(
        "wifi-config/grant",
        {
            "device_id": dev.id,
            "app_public_key": b64url_encode(e.public_key().public_bytes_raw()),
            "expires_in_seconds": 300,
        },
        key=secret,
    )
    assert reply["status"] == 200, reply
    body = reply["body"]
    assert "session_key" not in body
    claims = parse_unverified(body["grant_blob"])
    assert b64url_decode(claims["epk"]) == e.public_key().public_bytes_raw()
    assert claims["exp"] - claims["iat"] == 300

    jwks = (await rpc.call("wifi-config/keys", key=secret))["body"]["keys"]
    device = dev.reference(jwks)
    up = Uploader.for_grant(body["grant_blob"], ephemeral_private=e, device_public_key=dev.public)
    await complete_upload(device, up, body["grant_blob"])

    await eventually(lambda: any(e.get("op") == "wifi-config/grant" for e in logs.entries))
    line = next(e for e in logs.entries if e.get("op") == "wifi-config/grant")
    assert line["mode"] == "e2e"
    k_session = up.session_keys.raw
    text = logs_text(logs) + json.dumps(reply)
    assert_absent(
        text,
        [k_session, k_session[:32], k_session[32:], private_bytes(e), private_bytes(dev.private)],
        [PASSWORD],
    )
    assert_absent(logs_text(logs), signing_pems(daemon))


async def test_bridge_mode_in_process(config: Config, daemon: Server, logs: LogCapture) -> None:
    dev = Dev(config)
    service = grants(daemon)
    e = X25519PrivateKey.generate()  # what the BLE bridge makes for itself
    result = await service.issue(
        org_id=1, device_id=dev.id, app_public_key=e.public_key().public_bytes_raw()
    )
    assert result.mode == "e2e" and result.session_key is None
    assert result.device_public_key == dev.public
    claims = parse_unverified(result.grant_blob)
    assert result.epk == e.public_key().public_bytes_raw() == b64url_decode(claims["epk"])
    assert (result.jti, result.iat, result.exp) == (claims["jti"], claims["iat"], claims["exp"])
    device = dev.reference(service.verification_jwks(dev.id), nonce=os.urandom(16))
    up = Uploader.for_grant(result.grant_blob, ephemeral_private=e, device_public_key=dev.public)
    await complete_upload(device, up, result.grant_blob)
    assert not await service.is_consumed(result.jti)


async def test_grant_result_repr_hides_session_key(config: Config, daemon: Server) -> None:
    dev = Dev(config)
    result = await grants(daemon).issue(org_id=1, device_id=dev.id)
    assert result.session_key is not None
    assert all(s not in repr(result) for s in spellings(result.session_key))


async def test_device_nonce_is_bound(config: Config, rpc: RpcClient) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    jwks = (await rpc.call("wifi-config/keys", key=secret))["body"]["keys"]
    device = dev.reference(jwks, require_nonce=True)
    stale = device.nonce
    reply = await rpc.call(
        "wifi-config/grant",
        {"device_id": dev.id, "device_nonce": b64url_encode(device.nonce)},
        key=secret,
    )
    assert reply["status"] == 200
    assert device.accept_grant(reply["body"]["grant_blob"]).dn == stale
    # The device renewed its nonce; a second grant for the old one is refused.
    device.finish(False, "no_credentials")
    # Into the next whole second, so the grant's iat is newer and only the nonce can refuse it.
    await asyncio.sleep(1.02 - time.time() % 1)
    reply = await rpc.call(
        "wifi-config/grant", {"device_id": dev.id, "device_nonce": b64url_encode(stale)}, key=secret
    )
    with pytest.raises(GrantRejected) as info:
        device.accept_grant(reply["body"]["grant_blob"])
    assert info.value.reason == "wrong_nonce"


# --------------------------------------------------------------------------- request validation


async def test_expires_in_seconds_bounds_and_types(config: Config, rpc: RpcClient) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    for ok in (60, 3600):
        reply = await rpc.call(
            "wifi-config/grant", {"device_id": dev.id, "expires_in_seconds": ok}, key=secret
        )
        assert reply["status"] == 200, (ok, reply)
        claims = parse_unverified(reply["body"]["grant_blob"])
        assert claims["exp"] - claims["iat"] == ok
    for bad in (59, 3601, 900.5, "900", True, None, 0, -900, [900]):
        reply = await rpc.call(
            "wifi-config/grant", {"device_id": dev.id, "expires_in_seconds": bad}, key=secret
        )
        assert reply["status"] == 400, (bad, reply)
        assert reply["error"]["field"] == "expires_in_seconds", (bad, reply)


async def test_default_lifetime_is_fifteen_minutes(config: Config, rpc: RpcClient) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    before = time.time()
    reply = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=secret)
    after = time.time()
    expires_at = reply["body"]["expires_at"]
    assert expires_at.endswith("Z") and len(expires_at) == 20
    at = datetime.strptime(expires_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert int(before) + 900 <= at <= after + 900
    claims = parse_unverified(reply["body"]["grant_blob"])
    assert claims["exp"] == at and claims["exp"] - claims["iat"] == 900


async def test_device_id_integer_or_decimal_string(config: Config, rpc: RpcClient) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    reply = await rpc.call("wifi-config/grant", {"device_id": str(dev.id)}, key=secret)
    assert reply["status"] == 200
    assert parse_unverified(reply["body"]["grant_blob"])["sub"] == str(dev.id)
    for bad in ("abc", "0", "-1", "01", " 1", 0, -1, 1.5, True, None, "1" * 30, 2**70):
        reply = await rpc.call("wifi-config/grant", {"device_id": bad}, key=secret)
        assert reply["status"] == 400, (bad, reply)
        assert reply["error"]["field"] == "device_id", (bad, reply)
    reply = await rpc.call("wifi-config/grant", {}, key=secret)
    assert reply["status"] == 400 and reply["error"]["field"] == "device_id"
    reply = await rpc.call("wifi-config/grant", {"device_id": dev.id, "extra": 1}, key=secret)
    assert reply["status"] == 400 and reply["error"]["field"] == "extra"


async def test_bad_app_public_key_and_nonce(config: Config, rpc: RpcClient) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    good = b64url_encode(os.urandom(32))
    for bad in ("", "not base64!", good + "=", b64url_encode(os.urandom(31)), 42,
                b64url_encode(bytes(32))):  # fmt: skip
        reply = await rpc.call(
            "wifi-config/grant", {"device_id": dev.id, "app_public_key": bad}, key=secret
        )
        assert reply["status"] == 400, (bad, reply)
        assert reply["error"]["field"] == "app_public_key", (bad, reply)
    for bad_nonce in (b64url_encode(os.urandom(7)), b64url_encode(os.urandom(33)), "??", 5):
        reply = await rpc.call(
            "wifi-config/grant", {"device_id": dev.id, "device_nonce": bad_nonce}, key=secret
        )
        assert reply["status"] == 400, (bad_nonce, reply)
        assert reply["error"]["field"] == "device_nonce"


# --------------------------------------------------------------------------- refusals


async def test_refusals(config: Config, rpc: RpcClient) -> None:
    _, secret = seed_key(config)
    not_wifi = Dev(config, caps=0x01)
    pending = seed_device(config, active=False)
    other_org = Dev(config, org=2, owner=2)
    reply = await rpc.call("wifi-config/grant", {"device_id": not_wifi.id}, key=secret)
    assert reply["status"] == 400 and reply["error"]["code"] == "device_not_wifi_capable"
    reply = await rpc.call("wifi-config/grant", {"device_id": pending}, key=secret)
    assert reply["status"] == 409 and reply["error"]["code"] == "device_not_activated"
    unknown = await rpc.call("wifi-config/grant", {"device_id": 999_999}, key=secret)
    foreign = await rpc.call("wifi-config/grant", {"device_id": other_org.id}, key=secret)
    assert unknown["status"] == foreign["status"] == 404
    # Never reveal which: the two answers differ only in the id they echo.
    assert unknown["error"]["code"] == foreign["error"]["code"] == "device_not_found"

    _, read_only = seed_key(config, scopes=("devices:read",))
    dev = Dev(config)
    reply = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=read_only)
    assert reply["status"] == 403 and reply["error"]["code"] == "missing_scope"
    _, no_read = seed_key(config, scopes=("devices:write",))
    reply = await rpc.call("wifi-config/keys", {}, key=no_read)
    assert reply["status"] == 403


async def test_user_scoped_keys(config: Config, rpc: RpcClient) -> None:
    mine = Dev(config, owner=10)
    theirs = Dev(config, owner=11)
    _, own = seed_key(config, user=10, scopes=("devices:write",), permissions=("OWN_DEVICES_VIEW",))
    _, bare = seed_key(config, user=10, scopes=("devices:write",))
    _, org = seed_key(config, user=10, scopes=("devices:write",), permissions=("ORG_DEVICES_VIEW",))
    assert (await rpc.call("wifi-config/grant", {"device_id": mine.id}, key=own))["status"] == 200
    reply = await rpc.call("wifi-config/grant", {"device_id": theirs.id}, key=own)
    assert reply["status"] == 403 and reply["error"]["code"] == "not_device_owner"
    reply = await rpc.call("wifi-config/grant", {"device_id": mine.id}, key=bare)
    assert reply["status"] == 403 and reply["error"]["code"] == "missing_permission"
    assert (await rpc.call("wifi-config/grant", {"device_id": theirs.id}, key=org))["status"] == 200


async def test_server_generated_mode_can_be_disabled(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    config = make_config(tmp_path, broker, wifi={"allow_server_generated": False})
    _, secret = seed_key(config)
    dev = Dev(config)
    async with running(config), RpcClient(config) as rpc:
        reply = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=secret)
        assert reply["status"] == 400 and reply["error"]["field"] == "app_public_key"
        assert "app_public_key" in reply["error"]["message"]
        e = X25519PrivateKey.generate()
        reply = await rpc.call(
            "wifi-config/grant",
            {
                "device_id": dev.id,
                "app_public_key": b64url_encode(e.public_key().public_bytes_raw()),
            },
            key=secret,
        )
        assert reply["status"] == 200 and "session_key" not in reply["body"]


# --------------------------------------------------------------------------- consumed grants


@pytest.fixture
async def events(config: Config, daemon: Server) -> AsyncIterator[Events]:
    async with Events(config) as ev:
        yield ev


async def test_status_connected_records_consumed_and_emits_event(
    config: Config, rpc: RpcClient, daemon: Server, events: Events, logs: LogCapture
) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    reply = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=secret)
    blob, session_key = reply["body"]["grant_blob"], b64url_decode(reply["body"]["session_key"])
    claims = parse_unverified(blob)
    device = dev.reference(grants(daemon).verification_jwks(dev.id))
    await complete_upload(device, Uploader.for_grant(blob, session_key=session_key), blob)
    assert device.last_report is not None
    report = {k: v for k, v in device.last_report.items() if v is not None}

    await publish_status(config, dev.id, report)
    await eventually(lambda: len(events.items) >= 1)
    topic, event = events.items[0]
    assert topic == f"{config.mqtt.topic_prefix}/events/wifi/configured"
    assert event["device_id"] == dev.id and event["grant_id"] == claims["jti"]
    assert consumed_row(config, claims["jti"]) == (dev.id, claims["exp"], "connected")
    assert await grants(daemon).is_consumed(claims["jti"])

    # A repeat (or a QoS 1 redelivery) records nothing new and emits nothing new.
    await publish_status(config, dev.id, report)
    assert daemon.app is not None
    await eventually(lambda: daemon.app.counters["wifi.status.duplicate"] >= 1)  # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    assert len(events.items) == 1
    assert_absent(
        b"".join(events.raw).decode() + logs_text(logs),
        [session_key, private_bytes(dev.private)],
        [PASSWORD, blob],
    )


async def test_status_failed_emits_event_with_reason(
    config: Config, rpc: RpcClient, daemon: Server, events: Events
) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    e = X25519PrivateKey.generate()
    reply = await rpc.call(
        "wifi-config/grant",
        {"device_id": dev.id, "app_public_key": b64url_encode(e.public_key().public_bytes_raw())},
        key=secret,
    )
    jti = parse_unverified(reply["body"]["grant_blob"])["jti"]
    await publish_status(
        config, dev.id, {"grant_id": jti, "state": "failed", "reason": "wrong_password"}
    )
    await eventually(lambda: len(events.items) >= 1)
    topic, event = events.items[0]
    assert topic.endswith("/events/wifi/failed")
    assert (event["device_id"], event["grant_id"], event["reason"]) == (
        dev.id, jti, "wrong_password",
    )  # fmt: skip
    # The device spent the grant on the attempt, so it is not offered again.
    assert await grants(daemon).is_consumed(jti)


async def test_malformed_status_reports_are_counted_and_ignored(
    config: Config, rpc: RpcClient, daemon: Server, events: Events
) -> None:
    _, secret = seed_key(config)
    dev = Dev(config)
    other = Dev(config)
    reply = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=secret)
    jti = parse_unverified(reply["body"]["grant_blob"])["jti"]
    bad: list[Any] = [
        b"{not json",
        b"\xff\xfe",
        [1, 2],
        {"state": "connected"},
        {"grant_id": jti, "state": "online"},
        {"grant_id": jti, "state": "failed", "reason": "my password is hunter2"},
        {"grant_id": "x" * 200, "state": "connected"},
        {"grant_id": 5, "state": "connected"},
        b"x" * 5000,
    ]
    for payload in bad:
        await publish_status(config, dev.id, payload)
    # Someone else's grant, an unknown device, a non-numeric id: ignored too.
    await publish_status(config, other.id, {"grant_id": jti, "state": "connected"})
    await publish_status(
        config, 999_999, {"grant_id": "AAAAAAAAAAAAAAAAAAAAAA", "state": "connected"}
    )
    async with aiomqtt.Client("127.0.0.1", config.mqtt.port) as client:
        await client.publish(f"{config.mqtt.topic_prefix}/devices/abc/wifi/status", b"{}", qos=1)
    assert daemon.app is not None
    counters = daemon.app.counters
    await eventually(
        lambda: (
            counters["wifi.status.malformed"] >= len(bad) + 1
            and counters["wifi.status.wrong_device"] >= 1
            and counters["wifi.status.unknown_device"] >= 1
        )
    )
    await asyncio.sleep(0.1)
    assert events.items == []
    assert not await grants(daemon).is_consumed(jti)
    # Still serving.
    assert (await rpc.call("wifi-config/keys", key=secret))["status"] == 200


async def test_prune_drops_expired_consumed_grants(config: Config, daemon: Server) -> None:
    service = grants(daemon)
    now = int(time.time())
    assert await service.record_consumed(1, "old-grant", now - 1)
    assert await service.record_consumed(1, "live-grant", now + 600)
    assert not await service.record_consumed(1, "live-grant", now + 600)
    assert not await service.is_consumed("old-grant")
    assert await service.prune() == 1
    assert consumed_row(config, "old-grant") is None
    assert consumed_row(config, "live-grant") is not None


# --------------------------------------------------------------------------- keys


async def test_hs256_per_device_keys(tmp_path: Path, broker: Broker, logs: LogCapture) -> None:
    master = tmp_path / "hs256-master"
    # As an operator makes one (`openssl rand -base64 32`): raw random bytes end
    # in a newline, which secret files may carry and read_secret strips, 1 time in 128.
    master.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    master.chmod(0o600)
    config = make_config(
        tmp_path,
        broker,
        wifi={"signing_algorithm": "HS256", "hs256_master_secret_file": str(master)},
    )
    _, secret = seed_key(config)
    a, b = Dev(config), Dev(config)
    async with running(config) as server, RpcClient(config) as rpc:
        service = grants(server)
        jwk_a, jwk_b = service.verification_jwks(a.id), service.verification_jwks(b.id)
        assert jwk_a[0]["kty"] == "oct" and jwk_a[0]["alg"] == "HS256"
        assert jwk_a[0]["k"] != jwk_b[0]["k"] and jwk_a[0]["kid"] != jwk_b[0]["kid"]
        # Per-device keys are secrets: never in the published list.
        assert (await rpc.call("wifi-config/keys", key=secret))["body"]["keys"] == []

        reply = await rpc.call("wifi-config/grant", {"device_id": a.id}, key=secret)
        assert reply["status"] == 200
        blob = reply["body"]["grant_blob"]
        up = Uploader.for_grant(blob, session_key=b64url_decode(reply["body"]["session_key"]))
        await complete_upload(a.reference(jwk_a), up, blob)
        # Device b's key cannot verify device a's grant (nor could b's sub match).
        with pytest.raises(GrantRejected):
            ReferenceDevice(a.id, a.private, jwk_b).accept_grant(blob)
    assert_absent(logs_text(logs), [master.read_bytes(), b64url_decode(jwk_a[0]["k"])])


class ShiftedClock(Clock):
    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


@support.file_keys_only()
async def test_key_rotation_keeps_old_key_listed_until_verify_until(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    config = make_config(tmp_path, broker)
    _, secret = seed_key(config)
    dev = Dev(config)
    clock = ShiftedClock()
    async with running(config, clock=clock) as server, RpcClient(config) as rpc:
        service = grants(server)
        ring = service.keyring
        assert ring is not None
        old_jwks = (await rpc.call("wifi-config/keys", key=secret))["body"]["keys"]
        assert len(old_jwks) == 1
        before = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=secret)

        new = await asyncio.to_thread(ring.rotate, clock.now())
        listed = (await rpc.call("wifi-config/keys", key=secret))["body"]["keys"]
        assert [k["kid"] for k in listed] == [new.kid, old_jwks[0]["kid"]]
        # The grant signed before the rotation still verifies with the old pinned key...
        device = dev.reference(old_jwks, now=clock.now)
        device.accept_grant(before["body"]["grant_blob"])
        # ...and new grants carry the new kid.
        after = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=secret)
        header = json.loads(b64url_decode(after["body"]["grant_blob"].split(".")[0]))
        assert header["kid"] == new.kid

        old = ring.get(old_jwks[0]["kid"])
        assert old is not None and old.verify_until is not None
        clock.offset = old.verify_until - time.time() - 5
        assert len((await rpc.call("wifi-config/keys", key=secret))["body"]["keys"]) == 2
        clock.offset = old.verify_until - time.time() + 1
        listed = (await rpc.call("wifi-config/keys", key=secret))["body"]["keys"]
        assert [k["kid"] for k in listed] == [new.kid]
        await service.prune()
        keys_dir = Path(config.store.path).parent / "signing_keys"
        assert not (keys_dir / f"{old_jwks[0]['kid']}.pem").exists()


@support.file_keys_only()
async def test_generated_keys_are_private_and_survive_restart(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    config = make_config(tmp_path, broker, wifi={"signing_algorithm": "ES256"})
    async with running(config) as server:
        jwks = grants(server).public_jwks()
    keys_dir = Path(config.store.path).parent / "signing_keys"
    pems = list(keys_dir.glob("*.pem"))
    assert len(pems) == 1
    assert stat.S_IMODE(pems[0].stat().st_mode) == 0o600
    assert jwks[0]["kty"] == "EC" and jwks[0]["alg"] == "ES256"
    async with running(config) as server:
        assert grants(server).public_jwks() == jwks


async def test_signing_key_files_from_credentials_directory(
    tmp_path: Path, broker: Broker, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    creds = tmp_path / "creds"
    creds.mkdir()
    key = Ed25519PrivateKey.generate()
    (creds / "grant-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = make_config(tmp_path, broker, wifi={"signing_key_files": ["grant-key.pem"]})
    async with running(config) as server:
        jwks = grants(server).public_jwks()
    raw = key.public_key().public_bytes_raw()
    assert [b64url_decode(j["x"]) for j in jwks] == [raw]
    assert not (Path(config.store.path).parent / "signing_keys").exists()


async def test_invented_grant_ids_from_one_device_are_rate_limited(
    config: Config, rpc: RpcClient, daemon: Server, events: Events
) -> None:
    """A device reporting grant ids the daemon never issued gets a few per minute,
    not an unbounded ledger and event stream."""
    dev = Dev(config)
    for i in range(30):
        jti = b64url_encode(i.to_bytes(16, "big"))
        await publish_status(config, dev.id, {"grant_id": jti, "state": "failed", "reason": "x"})
    assert daemon.app is not None
    counters = daemon.app.counters
    await eventually(
        lambda: counters["wifi.status.failed"] + counters["wifi.status.rate_limited"] >= 30
    )
    assert counters["wifi.status.failed"] == 10
    assert counters["wifi.status.rate_limited"] == 20
    await eventually(lambda: len(events.items) >= 10)
    await asyncio.sleep(0.1)
    assert len(events.items) == 10
    db = open_db(config)
    assert db.execute("SELECT COUNT(*) FROM consumed_grants").fetchone()[0] == 10


# --------------------------------------------------------------------------- cached devices


async def test_a_reactivated_device_is_granted_under_its_new_key_at_once(
    config: Config, rpc: RpcClient
) -> None:
    """Grants read devices from a cache; a local re-activation must not leave it stale."""
    _, key = seed_key(config, users=(10,), scopes=("provision:write", "devices:write"))
    reply = await rpc.call("provision/token", {"orgId": 1, "ownerId": 10}, key=key)
    device_id = reply["body"]["deviceId"]

    async def activate(token: str) -> str:
        public = b64url_encode(X25519PrivateKey.generate().public_key().public_bytes_raw())
        body = {"token": token, "capabilities": WIFI, "public_key": public}
        assert (await rpc.call("device/activate", body))["status"] == 200
        return public

    async def granted_key() -> str:
        grant = await rpc.call("wifi-config/grant", {"device_id": device_id}, key=key)
        assert grant["status"] == 200, grant
        return str(grant["body"]["device_public_key"])

    first = await activate(reply["body"]["token"])
    assert await granted_key() == first  # now cached
    again = await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=key)
    # Until it activates again the device keeps its key, and the cache has it.
    assert await granted_key() == first
    second = await activate(again["body"]["token"])
    assert await granted_key() == second


async def test_a_device_changed_by_another_process_is_seen_within_the_poll(
    config: Config, rpc: RpcClient
) -> None:
    """Another process's commit (the CLI, a second daemon) clears the cache within ~0.2 s."""
    _, key = seed_key(config)
    dev = Dev(config)
    assert (await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=key))["status"] == 200
    db = open_db(config)
    with transaction(db):
        db.execute("UPDATE devices SET capabilities = 1 WHERE id = ?", [dev.id])
    db.conn.close()
    changed_at = time.monotonic()

    while True:
        reply = await rpc.call("wifi-config/grant", {"device_id": dev.id}, key=key)
        if reply.get("error", {}).get("code") == "device_not_wifi_capable":
            break
        assert reply["status"] == 200  # still the cached record, for at most one poll
        assert time.monotonic() - changed_at < 1.5, "the change was never seen"
        await asyncio.sleep(0.02)


def test_daemons_starting_together_on_one_keys_dir_share_one_first_key(tmp_path: Path) -> None:
    """A group on SQLite may share a keys directory; its daemons start at once.

    Each process makes the ring if it is missing: all must end up with the
    same single key (before the lock, each made its own, the last index won,
    and a rename could fail outright).
    """
    import subprocess
    import sys

    directory = tmp_path / "signing_keys"
    start = time.time() + 1.0  # every process is up before any of them begins
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from provisiond.wifi.signing import KeyRing\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "print(KeyRing.load_or_create(Path(sys.argv[1]), 'ES256', now=time.time()).active.kid)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(directory), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outcomes = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outcomes]
    kids = {out.strip() for out, _ in outcomes}
    assert len(kids) == 1
    index = json.loads((directory / "keys.json").read_text())
    assert [k["kid"] for k in index["keys"]] == list(kids)
