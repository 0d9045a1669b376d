"""Provisioning lifecycle over a real mosquitto: tokens, activation, re-provisioning (docs/protocol.md §6)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from provision_support import (
    FakeClock,
    activate,
    count,
    device_public_key,
    org_key,
    provision,
    rows,
    token_rows,
)
from structlog.testing import LogCapture

import support
from provisiond.config import Config
from provisiond.ops import devices as device_ops
from provisiond.ops import provision as provision_ops
from provisiond.presence import PRESENCE
from provisiond.rpc import Router
from provisiond.runtime.app import App
from provisiond.runtime.features import Feature
from provisiond.server import Server
from provisiond.store import dialect
from provisiond.wifi.crypto import b64url_decode, b64url_encode
from provisiond.wifi.service import GRANTS
from support import (
    RpcClient,
    cases,
    eventually,
    make_config,
    open_db,
    remember_secret,
    running,
    seed_key,
)

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

TOKEN_RE = re.compile(r"^[A-Za-z0-9]{32}$")
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def Events(config: Config) -> support.Events:
    return support.Events(config, "device/#")


@pytest.fixture
async def events(config: Config, daemon: Server) -> AsyncIterator[Events]:
    async with Events(config) as ev:
        yield ev


# --- tokens


async def test_provision_token_shape_device_and_hashed_storage(
    config: Config, rpc: RpcClient
) -> None:
    key = org_key(config)
    token, device_id = await provision(rpc, key)
    assert TOKEN_RE.fullmatch(token)
    assert isinstance(device_id, int) and device_id > 0
    other, other_id = await provision(rpc, key)
    assert other != token and other_id != device_id

    device = rows(config, "SELECT org_id, owner_id, state, capabilities, public_key FROM devices WHERE id = ?", (device_id,))  # fmt: skip
    assert device == [(1, 10, "pending", 0, None)]
    (stored,) = rows(
        config,
        "SELECT hash, created_at, expires_at, used_at, revoked_at FROM provision_tokens WHERE device_id = ?",
        (device_id,),
    )
    assert stored[0] == hashlib.sha256(token.encode()).hexdigest()
    assert stored[2] - stored[1] == config.tokens.lifetime_seconds
    assert stored[3] is None and stored[4] is None


async def test_activation_consumes_token_and_records_device(
    config: Config, rpc: RpcClient, events: Events
) -> None:
    token, device_id = await provision(rpc, org_key(config))
    pk = device_public_key()
    reply = await activate(rpc, token, capabilities=0x03, public_key=pk, firmware_version="1.4.2")
    assert reply["status"] == 200, reply
    body = reply["body"]
    assert body["deviceId"] == device_id
    assert body["heartbeat_interval"] == config.presence.heartbeat_interval_seconds
    assert isinstance(body["grant_verification_keys"], list)
    assert body["gateway_id"] == config.daemon.gateway_id

    (row,) = rows(
        config,
        "SELECT state, capabilities, public_key, firmware_version, activated_at FROM devices WHERE id = ?",
        (device_id,),
    )
    assert row[:4] == ("active", 3, b64url_decode(pk), "1.4.2") and row[4] is not None
    assert token_rows(config, device_id)[0][1] is not None  # used_at

    # Single use: the same token again (a new request, not a replay) is gone.
    again = await activate(rpc, token)
    assert again["status"] == 410 and again["error"]["code"] == "token_used"
    assert rows(config, "SELECT capabilities FROM devices WHERE id = ?", (device_id,)) == [(3,)]

    await eventually(lambda: len(events.items) >= 1)
    topic, event = events.items[0]
    assert topic == f"{config.mqtt.topic_prefix}/events/device/activated"
    assert event["deviceId"] == device_id and event["reactivation"] is False
    assert event["capabilities"] == 3 and event["orgId"] == 1 and event["ownerId"] == 10
    assert token.encode() not in b"".join(events.raw)


async def test_activation_replay_with_same_correlation_gets_first_reply(
    config: Config, rpc: RpcClient
) -> None:
    token, device_id = await provision(rpc, org_key(config))
    corr = b"act-" + uuid.uuid4().bytes
    body = {"token": token, "capabilities": 2, "public_key": device_public_key()}
    first = await rpc.call("device/activate", body, correlation=corr)
    second = await rpc.call("device/activate", body, correlation=corr)
    assert first["status"] == 200 and first == second
    assert first["body"]["deviceId"] == device_id


async def test_unknown_token_is_401(config: Config, rpc: RpcClient) -> None:
    await provision(rpc, org_key(config))
    reply = await activate(rpc, "A" * 32)
    assert reply["status"] == 401 and reply["error"]["field"] == "token"
    reply = await activate(rpc, "short")
    assert reply["status"] == 401


async def test_expired_token_is_410_and_changes_nothing(tmp_path: Path, broker: Any) -> None:
    config = make_config(tmp_path, broker, tokens={"lifetime_seconds": 60})
    clock = FakeClock()
    key = org_key(config)
    async with running(config, clock=clock), RpcClient(config) as rpc:
        token, device_id = await provision(rpc, key)
        clock.offset = 59
        fresh, fresh_id = await provision(rpc, key)
        clock.offset = 61
        reply = await activate(rpc, token)
        assert reply["status"] == 410 and reply["error"]["code"] == "token_expired"
        assert rows(config, "SELECT state FROM devices WHERE id = ?", (device_id,)) == [
            ("pending",)
        ]
        assert token_rows(config, device_id)[0][1] is None  # not marked used
        # Issued at +59 s, so still valid at +61 s: expiry is per token.
        assert (await activate(rpc, fresh))["status"] == 200
        # A re-provision gives an expired device a fresh token.
        again = await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=key)
        assert again["status"] == 200
        assert (await activate(rpc, remember_secret(again["body"]["token"])))["status"] == 200
        assert fresh_id != device_id


# --- re-provisioning


async def test_reprovision_revokes_earlier_token_and_keeps_device(
    config: Config, rpc: RpcClient, events: Events
) -> None:
    key = org_key(config)
    first, device_id = await provision(rpc, key)
    pk1 = device_public_key()
    assert (await activate(rpc, first, capabilities=0x02, public_key=pk1, firmware_version="1.0"))["status"] == 200  # fmt: skip
    (before,) = rows(config, "SELECT org_id, owner_id, created_at, activated_at FROM devices WHERE id = ?", (device_id,))  # fmt: skip

    reply = await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=key)
    assert reply["status"] == 200
    second = remember_secret(reply["body"]["token"])
    assert reply["body"]["deviceId"] == device_id and TOKEN_RE.fullmatch(second) and second != first
    reply = await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=key)
    third = remember_secret(reply["body"]["token"])

    # Until re-activation the device keeps everything, including its state and key.
    (row,) = rows(config, "SELECT state, capabilities, public_key, reprovisioned_at FROM devices WHERE id = ?", (device_id,))  # fmt: skip
    assert row[:3] == ("active", 2, b64url_decode(pk1)) and row[3] is not None

    revoked = await activate(rpc, second)
    assert revoked["status"] == 410 and revoked["error"]["code"] == "token_revoked"
    assert (await activate(rpc, first))["status"] == 410

    pk2 = device_public_key()
    reply = await activate(rpc, third, capabilities=0x01, public_key=pk2)
    assert reply["status"] == 200 and reply["body"]["deviceId"] == device_id
    (after,) = rows(config, "SELECT org_id, owner_id, created_at, activated_at, state, capabilities, public_key FROM devices WHERE id = ?", (device_id,))  # fmt: skip
    assert after[:3] == before[:3]
    assert after[3] >= before[3]
    assert after[4:] == ("active", 1, b64url_decode(pk2))
    assert count(config, "devices") == 1

    await eventually(lambda: len(events.items) >= 4)
    names = [topic.rsplit("/", 1)[1] for topic, _ in events.items]
    assert names == ["activated", "reprovisioned", "reprovisioned", "activated"]
    assert events.items[1][1] == {
        "event": "device/reprovisioned", "at": events.items[1][1]["at"],
        "deviceId": device_id, "orgId": 1, "ownerId": 10,
    }  # fmt: skip
    assert events.items[3][1]["reactivation"] is True
    raw = b"".join(events.raw)
    assert not any(t.encode() in raw for t in (first, second, third))


async def test_concurrent_reprovisions_leave_exactly_one_live_token(
    config: Config, rpc: RpcClient
) -> None:
    key = org_key(config)
    _, device_id = await provision(rpc, key)
    futures = [
        await rpc.send("provision/reprovision/token", {"deviceId": device_id}, key=key)
        for _ in range(20)
    ]
    replies = await asyncio.wait_for(asyncio.gather(*futures), 20)
    assert all(r["status"] == 200 for r in replies)
    issued = {remember_secret(r["body"]["token"]) for r in replies}
    assert len(issued) == 20

    live = rows(
        config,
        "SELECT hash FROM provision_tokens WHERE device_id = ? AND used_at IS NULL"
        " AND revoked_at IS NULL",
        (device_id,),
    )
    assert len(live) == 1
    (winner,) = [t for t in issued if hashlib.sha256(t.encode()).hexdigest() == live[0][0]]
    ordered = sorted(issued)
    results = await asyncio.gather(*(activate(rpc, t) for t in ordered))
    statuses = {t: r["status"] for t, r in zip(ordered, results, strict=True)}
    assert statuses.pop(winner) == 200
    assert set(statuses.values()) == {410}


# --- idempotency


async def test_repeated_provision_with_same_correlation_creates_one_device(
    config: Config, rpc: RpcClient
) -> None:
    key = org_key(config)
    corr = b"prov-" + uuid.uuid4().bytes
    body = {"orgId": 1, "ownerId": 10}
    first = await rpc.call("provision/token", body, key=key, correlation=corr)
    second = await rpc.call("provision/token", body, key=key, correlation=corr)
    assert first["status"] == 200 and first == second
    remember_secret(first["body"]["token"])
    assert count(config, "devices") == 1 and count(config, "provision_tokens") == 1

    # Sent twice at once (a redelivery racing the original): still one device.
    corr2 = b"prov-" + uuid.uuid4().bytes
    await rpc.send("provision/token", body, key=key, correlation=corr2)
    # The client files replies by correlation: the second send takes over the
    # first's slot, so one reply resolves it and the other lands in `unmatched`.
    rb = await asyncio.wait_for(
        await rpc.send("provision/token", body, key=key, correlation=corr2), 10
    )
    await eventually(lambda: rpc.unmatched)
    ra = rpc.unmatched[-1]
    assert ra["status"] == 200 and ra == rb
    remember_secret(ra["body"]["token"])
    assert count(config, "devices") == 2

    # The same correlation from another key is another request.
    other = await rpc.call("provision/token", body, key=org_key(config), correlation=corr)
    remember_secret(other["body"]["token"])
    assert other["status"] == 200 and other["body"]["deviceId"] != first["body"]["deviceId"]


# --- secrets


async def test_token_never_in_database_in_clear_nor_in_logs(
    config: Config, rpc: RpcClient, logs: LogCapture, daemon: Server
) -> None:
    key = org_key(config)
    token, device_id = await provision(rpc, key)
    reply = await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=key)
    retoken = remember_secret(reply["body"]["token"])
    await activate(rpc, token)  # revoked: refused
    await activate(rpc, retoken, firmware_version="2.0")
    await activate(rpc, retoken)  # used: refused
    await rpc.call("device/activate", {"token": token + "x", "capabilities": -1, "public_key": "?"})
    secrets = [token, retoken]

    # Every cell of every table.
    conn = open_db(config)
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            if dialect(conn) == "postgresql"
            else "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    ]
    assert {"devices", "provision_tokens", "replays"} <= set(tables)
    for table in tables:
        for row in conn.execute(f'SELECT * FROM "{table}"'):
            for cell in row:
                blob = cell if isinstance(cell, bytes) else str(cell).encode()
                for secret in secrets:
                    assert secret.encode() not in blob, f"token in clear in table {table}"
    conn.conn.close()
    # And the raw files, WAL included, for anything not yet checkpointed.
    for path in Path(config.store.path).parent.glob(Path(config.store.path).name + "*"):
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"token in clear in {path.name}"

    await eventually(lambda: sum(e["event"] == "rpc" for e in logs.entries) >= 6)
    assert logs.entries
    text = repr(logs.entries)
    for secret in secrets:
        assert secret not in text
    activations = [e for e in logs.entries if e["event"] == "rpc" and e["op"] == "device/activate"]
    assert any(e.get("device") == device_id and e["status"] == 200 for e in activations)


# --- bad bodies


def _pk() -> str:
    return device_public_key()


BAD_PROVISION: list[tuple[str, dict[str, Any], str]] = [
    ("missing orgId", {"ownerId": 10}, "orgId"),
    ("missing ownerId", {"orgId": 1}, "ownerId"),
    ("orgId as string", {"orgId": "1", "ownerId": 10}, "orgId"),
    ("ownerId as string", {"orgId": 1, "ownerId": "10"}, "ownerId"),
    ("orgId as float", {"orgId": 1.0, "ownerId": 10}, "orgId"),
    ("orgId as bool", {"orgId": True, "ownerId": 10}, "orgId"),
    ("orgId null", {"orgId": None, "ownerId": 10}, "orgId"),
    ("negative orgId", {"orgId": -1, "ownerId": 10}, "orgId"),
    ("zero orgId", {"orgId": 0, "ownerId": 10}, "orgId"),
    ("negative ownerId", {"orgId": 1, "ownerId": -10}, "ownerId"),
    ("orgId beyond int32", {"orgId": 2**31, "ownerId": 10}, "orgId"),
    ("ownerId beyond int64", {"orgId": 1, "ownerId": 2**63}, "ownerId"),
    ("unknown user", {"orgId": 1, "ownerId": 999}, "ownerId"),
    ("user of another organisation", {"orgId": 1, "ownerId": 20}, "ownerId"),
    ("unknown field", {"orgId": 1, "ownerId": 10, "state": "active"}, "state"),
]


@cases(("case", "body", "field"), BAD_PROVISION)
async def test_bad_provision_body_is_400_naming_field_and_writes_nothing(
    config: Config, rpc: RpcClient, case: str, body: dict[str, Any], field: str
) -> None:
    key = org_key(config)
    seed_key(config, org=2, users=(20,))
    reply = await rpc.call("provision/token", body, key=key)
    assert reply["status"] == 400, reply
    assert reply["error"]["field"] == field
    assert count(config, "devices") == 0 and count(config, "provision_tokens") == 0
    assert count(config, "replays") == 0


BAD_REPROVISION: list[tuple[str, dict[str, Any], str]] = [
    ("missing deviceId", {}, "deviceId"),
    ("deviceId as string", {"deviceId": "1"}, "deviceId"),
    ("deviceId as float", {"deviceId": 1.0}, "deviceId"),
    ("negative deviceId", {"deviceId": -1}, "deviceId"),
    ("deviceId beyond int32", {"deviceId": 2**31}, "deviceId"),
    ("unknown field", {"deviceId": 1, "orgId": 1}, "orgId"),
]


@cases(("case", "body", "field"), BAD_REPROVISION)
async def test_bad_reprovision_body_is_400_and_keeps_token(
    config: Config, rpc: RpcClient, case: str, body: dict[str, Any], field: str
) -> None:
    key = org_key(config)
    _, device_id = await provision(rpc, key)
    assert device_id == 1
    reply = await rpc.call("provision/reprovision/token", body, key=key)
    assert reply["status"] == 400 and reply["error"]["field"] == field, reply
    assert [r[2] for r in token_rows(config, device_id)] == [None]  # nothing revoked
    assert count(config, "provision_tokens") == 1


LOW_ORDER = b64url_encode(bytes(32))
BAD_ACTIVATION: list[tuple[str, dict[str, Any], str]] = [
    ("10 kB token", {"token": "A" * 10_000}, "token"),
    ("token as number", {"token": 12345}, "token"),
    ("missing token", {"token": None}, "token"),
    ("missing capabilities", {"capabilities": None}, "capabilities"),
    ("capabilities as string", {"capabilities": "2"}, "capabilities"),
    ("capabilities as bool", {"capabilities": True}, "capabilities"),
    ("negative capabilities", {"capabilities": -1}, "capabilities"),
    ("capabilities beyond int32", {"capabilities": 2**31}, "capabilities"),
    ("missing public_key", {"public_key": None}, "public_key"),
    ("public_key 31 bytes", {"public_key": b64url_encode(bytes(range(1, 32)))}, "public_key"),
    ("public_key 33 bytes", {"public_key": b64url_encode(bytes(range(1, 34)))}, "public_key"),
    ("public_key standard base64", {"public_key": "+/" + "A" * 41}, "public_key"),
    ("public_key padded", {"public_key": b64url_encode(bytes(range(1, 33))) + "="}, "public_key"),
    ("public_key low-order point", {"public_key": LOW_ORDER}, "public_key"),
    ("public_key as hex", {"public_key": bytes(range(1, 33)).hex()}, "public_key"),
    ("firmware_version too long", {"firmware_version": "1" * 65}, "firmware_version"),
    ("firmware_version control chars", {"firmware_version": "1.0\n"}, "firmware_version"),
    ("firmware_version as number", {"firmware_version": 1}, "firmware_version"),
    ("unknown field", {"deviceId": 1}, "deviceId"),
]


@cases(("case", "change", "field"), BAD_ACTIVATION)
async def test_bad_activation_body_is_400_and_leaves_token_usable(
    config: Config, rpc: RpcClient, case: str, change: dict[str, Any], field: str
) -> None:
    token, device_id = await provision(rpc, org_key(config))
    body: dict[str, Any] = {"token": token, "capabilities": 2, "public_key": _pk()}
    for name, value in change.items():
        if value is None:
            body.pop(name)
        else:
            body[name] = value
    reply = await rpc.call("device/activate", body)
    assert reply["status"] == 400, reply
    assert reply["error"]["field"] == field
    assert rows(config, "SELECT state, public_key FROM devices WHERE id = ?", (device_id,)) == [("pending", None)]  # fmt: skip
    assert token_rows(config, device_id)[0][1] is None
    assert (await activate(rpc, token))["status"] == 200


# --- integration points for other features


async def test_activation_returns_grant_keys_from_the_service_and_views_carry_presence(
    config: Config, logs: LogCapture
) -> None:
    def fake_services(app: App, _router: Router) -> None:
        grants = SimpleNamespace(
            verification_jwks=lambda device_id: [{"kty": "OKP", "kid": f"k-{device_id}"}]
        )
        presence = SimpleNamespace(
            presence_of=lambda device_id: {"online": device_id % 2 == 1},
            device_activated=lambda _device_id: None,
        )
        app.services.provide(GRANTS, grants)
        app.services.provide(PRESENCE, presence)

    key = org_key(config)
    features = [
        Feature("fakes", fake_services, provides=(GRANTS, PRESENCE)),
        Feature("provision", provision_ops.setup, uses=(GRANTS, PRESENCE)),
        Feature("devices", device_ops.setup, uses=(PRESENCE,)),
    ]
    async with running(config, features=features), RpcClient(config) as rpc:
        token, device_id = await provision(rpc, key)
        reply = await activate(rpc, token)
        assert reply["body"]["grant_verification_keys"] == [{"kty": "OKP", "kid": f"k-{device_id}"}]
        got = await rpc.call("device/get", {"deviceId": device_id}, key=key)
        assert got["body"]["presence"] == {"online": device_id % 2 == 1}
        listed = await rpc.call("device/list", {}, key=key)
        assert listed["body"]["devices"][0]["presence"] == {"online": device_id % 2 == 1}

    # Without those services a device still activates, with nothing to pin yet.
    alone = [Feature("provision", provision_ops.setup), Feature("devices", device_ops.setup)]
    async with running(config, features=alone), RpcClient(config) as rpc:
        token, device_id = await provision(rpc, key)
        reply = await activate(rpc, token)
        assert reply["status"] == 200 and reply["body"]["grant_verification_keys"] == []
        got = await rpc.call("device/get", {"deviceId": device_id}, key=key)
        assert "presence" not in got["body"]


async def test_device_get_and_list_views(config: Config, rpc: RpcClient) -> None:
    key = org_key(config, users=(10, 11))
    ids = []
    for owner in (10, 11, 10, 10, 11):
        token, device_id = await provision(rpc, key, owner=owner)
        ids.append(device_id)
    await activate(rpc, token, capabilities=6, firmware_version="3.1")

    got = await rpc.call("device/get", {"deviceId": ids[-1]}, key=key)
    assert got["status"] == 200
    view = got["body"]
    assert set(view) - {"presence"} == {
        "deviceId", "orgId", "ownerId", "state", "capabilities", "firmware_version",
        "created_at", "activated_at", "reprovisioned_at",
    }  # fmt: skip
    assert (view["deviceId"], view["orgId"], view["ownerId"], view["state"]) == (
        ids[-1],
        1,
        11,
        "active",
    )
    assert (view["capabilities"], view["firmware_version"]) == (6, "3.1")
    assert ISO_Z.fullmatch(view["created_at"]) and ISO_Z.fullmatch(view["activated_at"])
    assert view["reprovisioned_at"] is None
    assert token not in json.dumps(got)

    seen: list[int] = []
    after: int | None = None
    pages = 0
    while True:
        body: dict[str, Any] = {"limit": 2} if after is None else {"limit": 2, "after": after}
        reply = await rpc.call("device/list", body, key=key)
        assert reply["status"] == 200
        seen += [d["deviceId"] for d in reply["body"]["devices"]]
        pages += 1
        after = reply["body"]["next"]
        if after is None:
            break
    assert seen == ids and pages == 3
    full = await rpc.call("device/list", {}, key=key)
    assert [d["deviceId"] for d in full["body"]["devices"]] == ids and full["body"]["next"] is None
    for bad in ({"limit": 0}, {"limit": 501}, {"limit": "2"}, {"after": -1}, {"page": 1}):
        reply = await rpc.call("device/list", bad, key=key)
        assert reply["status"] == 400 and reply["error"]["field"] == next(iter(bad)), (bad, reply)
