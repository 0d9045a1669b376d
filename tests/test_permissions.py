"""The seed's permission rules (docs/protocol.md §4), one case per rule, over a real mosquitto.

World: organisation 1 with users 10 (the caller of user-scoped keys) and 11;
organisation 2 with user 20. Devices: "own" (org 1, owner 10), "other"
(org 1, owner 11), "foreign" (org 2, owner 20), and "missing" (no such id).

`provision/reconfigure` follows the same rule as `provision/reprovision/token`
through `permissions.provisionable_device`; it is exercised here through
re-provisioning, and its own tests live with the reconfigure feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from provision_support import ALL_SCOPES, provision

from provisiond.config import Config
from provisiond.permissions import (
    ORG_DEVICES_VIEW,
    ORG_VIEW_USERS,
    OWN_DEVICES_VIEW,
    PROVISION_DEVICES,
)
from provisiond.store import transaction
from support import RpcClient, cases, open_db, remember_secret, rows, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

PD, OVU, OWN, ORGV = PROVISION_DEVICES, ORG_VIEW_USERS, OWN_DEVICES_VIEW, ORG_DEVICES_VIEW
MISSING_DEVICE = 987_654


@dataclass(frozen=True)
class Key:
    """A key to create for one case: None user means an organisation-level key."""

    user: int | None = 10
    permissions: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ALL_SCOPES
    org: int = 1


ORG_KEY = Key(user=None)


async def make_world(config: Config, rpc: RpcClient) -> dict[str, int]:
    admin1 = seed_key(config, org=1, users=(10, 11), scopes=ALL_SCOPES)[1]
    admin2 = seed_key(config, org=2, users=(20,), scopes=ALL_SCOPES)[1]
    return {
        "own": (await provision(rpc, admin1, org=1, owner=10))[1],
        "other": (await provision(rpc, admin1, org=1, owner=11))[1],
        "foreign": (await provision(rpc, admin2, org=2, owner=20))[1],
        "missing": MISSING_DEVICE,
    }


def make_key(config: Config, key: Key) -> str:
    return seed_key(
        config, org=key.org, user=key.user, scopes=key.scopes, permissions=key.permissions
    )[1]


async def world_and_key(config: Config, rpc: RpcClient, key: Key) -> tuple[dict[str, int], str]:
    """The devices every rule is tried on, then the key the rule is about."""
    return await make_world(config, rpc), make_key(config, key)


def _remember(reply: dict[str, Any]) -> dict[str, Any]:
    token = reply.get("body", {}).get("token")
    if token:
        remember_secret(token)
    return reply


# --- provision/token: PROVISION_DEVICES; ORG_VIEW_USERS when ownerId is not the key's user


PROVISION_RULES: list[tuple[str, Key, int, int, int]] = [
    # (rule, key, orgId, ownerId, expected status)
    ("org key may provision for any user of its org", ORG_KEY, 1, 11, 200),
    (
        "org key without provision:write scope is refused",
        Key(None, scopes=("devices:read",)),
        1,
        10,
        403,
    ),
    ("org key may not provision into another org", ORG_KEY, 2, 20, 403),
    ("org key: ownerId must be a user of orgId", ORG_KEY, 1, 20, 400),
    ("org key: unknown ownerId", ORG_KEY, 1, 999, 400),
    ("user key with PROVISION_DEVICES, ownerId = self", Key(permissions=(PD,)), 1, 10, 200),
    ("user key without PROVISION_DEVICES, ownerId = self", Key(permissions=()), 1, 10, 403),
    ("user key with only ORG_VIEW_USERS, ownerId = self", Key(permissions=(OVU,)), 1, 10, 403),
    (
        "user key PROVISION_DEVICES, ownerId != self, no ORG_VIEW_USERS",
        Key(permissions=(PD,)),
        1,
        11,
        403,
    ),
    (
        "user key PROVISION_DEVICES + ORG_VIEW_USERS, ownerId != self",
        Key(permissions=(PD, OVU)),
        1,
        11,
        200,
    ),
    (
        "user key ORG_VIEW_USERS without PROVISION_DEVICES, ownerId != self",
        Key(permissions=(OVU,)),
        1,
        11,
        403,
    ),
    ("user key may not provision into another org", Key(permissions=(PD, OVU)), 2, 20, 403),
    (
        "user key with all permissions: ownerId must be a user of orgId",
        Key(permissions=(PD, OVU)),
        1,
        20,
        400,
    ),
    # Without ORG_VIEW_USERS a key may not learn which users exist: 403, not 400.
    (
        "user key without ORG_VIEW_USERS cannot probe unknown users",
        Key(permissions=(PD,)),
        1,
        999,
        403,
    ),
    (
        "user key without provision:write scope is refused",
        Key(permissions=(PD, OVU), scopes=("devices:read",)),
        1,
        10,
        403,
    ),
]


@cases(("rule", "key", "org", "owner", "status"), PROVISION_RULES)
async def test_provision_token_rule(
    config: Config, rpc: RpcClient, rule: str, key: Key, org: int, owner: int, status: int
) -> None:
    _world, secret = await world_and_key(config, rpc, key)
    before = _count(config)
    reply = _remember(
        await rpc.call("provision/token", {"orgId": org, "ownerId": owner}, key=secret)
    )
    assert reply["status"] == status, reply
    if status == 200:
        assert _owner_of(config, reply["body"]["deviceId"]) == (org, owner)
        assert _count(config) == before + 1
    else:
        assert _count(config) == before
    if status == 400:
        assert reply["error"]["field"] == "ownerId"


# --- provision/reprovision/token (and reconfigure): PROVISION_DEVICES and a view
# permission; own devices only unless ORG_DEVICES_VIEW; other orgs are 404


DEVICE_RULES: list[tuple[str, Key, str, int]] = [
    ("org key, device of its org", ORG_KEY, "other", 200),
    ("org key, device of another org is not found", ORG_KEY, "foreign", 404),
    ("org key, unknown device is not found", ORG_KEY, "missing", 404),
    ("org key without provision:write scope", Key(None, scopes=("devices:read",)), "own", 403),
    (
        "user PROVISION_DEVICES + OWN_DEVICES_VIEW, own device",
        Key(permissions=(PD, OWN)),
        "own",
        200,
    ),
    (
        "user PROVISION_DEVICES + OWN_DEVICES_VIEW, not own device",
        Key(permissions=(PD, OWN)),
        "other",
        403,
    ),
    (
        "user PROVISION_DEVICES + ORG_DEVICES_VIEW, own device",
        Key(permissions=(PD, ORGV)),
        "own",
        200,
    ),
    (
        "user PROVISION_DEVICES + ORG_DEVICES_VIEW, not own device",
        Key(permissions=(PD, ORGV)),
        "other",
        200,
    ),
    (
        "user PROVISION_DEVICES without a view permission, own device",
        Key(permissions=(PD,)),
        "own",
        403,
    ),
    (
        "user OWN_DEVICES_VIEW without PROVISION_DEVICES, own device",
        Key(permissions=(OWN,)),
        "own",
        403,
    ),
    (
        "user ORG_DEVICES_VIEW without PROVISION_DEVICES, not own device",
        Key(permissions=(ORGV,)),
        "other",
        403,
    ),
    (
        "user with all permissions, device of another org is not found",
        Key(permissions=(PD, OVU, OWN, ORGV)),
        "foreign",
        404,
    ),
    (
        "user PROVISION_DEVICES + OWN_DEVICES_VIEW, device of another org is not found",
        Key(permissions=(PD, OWN)),
        "foreign",
        404,
    ),
    (
        "user with all permissions, unknown device is not found",
        Key(permissions=(PD, ORGV)),
        "missing",
        404,
    ),
    (
        "user without provision:write scope",
        Key(permissions=(PD, ORGV), scopes=("devices:read",)),
        "own",
        403,
    ),
]


@cases(("rule", "key", "target", "status"), DEVICE_RULES)
async def test_reprovision_rule(
    config: Config, rpc: RpcClient, rule: str, key: Key, target: str, status: int
) -> None:
    world, secret = await world_and_key(config, rpc, key)
    device_id = world[target]
    tokens_before = _tokens(config)
    reply = _remember(
        await rpc.call("provision/reprovision/token", {"deviceId": device_id}, key=secret)
    )
    assert reply["status"] == status, reply
    if status == 200:
        assert reply["body"]["deviceId"] == device_id
        assert _tokens(config) == tokens_before + 1
    else:
        assert _tokens(config) == tokens_before
    if status == 404:
        # Another organisation's device and a missing one answer identically.
        assert reply["error"] == {
            "code": "device_not_found",
            "message": f"device {device_id} not found",
            "field": "deviceId",
        }


@cases(("rule", "key", "target", "status"), DEVICE_RULES)
async def test_reconfigure_rule(
    config: Config, rpc: RpcClient, rule: str, key: Key, target: str, status: int
) -> None:
    """The seed's reconfigure rules are the re-provisioning rules, on active devices."""
    world, secret = await world_and_key(config, rpc, key)
    db = open_db(config)
    with transaction(db):
        db.execute("UPDATE devices SET state = 'active', public_key = ?", [bytes(range(1, 33))])
    db.conn.close()
    device_id = world[target]
    before = rows(config, "SELECT COUNT(*) FROM commands")[0][0]
    reply = await rpc.call("provision/reconfigure", {"deviceId": device_id}, key=secret)
    assert reply["status"] == status, reply
    after = rows(config, "SELECT COUNT(*) FROM commands")[0][0]
    assert after == before + (1 if status == 200 else 0)
    if status == 404:
        assert reply["error"]["code"] == "device_not_found"


# --- device/get: devices:read; OWN_DEVICES_VIEW sees own, ORG_DEVICES_VIEW sees the org


VIEW_RULES: list[tuple[str, Key, str, int]] = [
    ("org key, device of its org", ORG_KEY, "other", 200),
    ("org key, device of another org is not found", ORG_KEY, "foreign", 404),
    ("org key without devices:read scope", Key(None, scopes=("provision:write",)), "own", 403),
    ("user OWN_DEVICES_VIEW, own device", Key(permissions=(OWN,)), "own", 200),
    ("user OWN_DEVICES_VIEW, not own device", Key(permissions=(OWN,)), "other", 403),
    ("user ORG_DEVICES_VIEW, not own device", Key(permissions=(ORGV,)), "other", 200),
    ("user without a view permission, own device", Key(permissions=(PD, OVU)), "own", 403),
    (
        "user ORG_DEVICES_VIEW, device of another org is not found",
        Key(permissions=(ORGV,)),
        "foreign",
        404,
    ),
    ("user OWN_DEVICES_VIEW, unknown device is not found", Key(permissions=(OWN,)), "missing", 404),
    (
        "user ORG_DEVICES_VIEW without devices:read scope",
        Key(permissions=(ORGV,), scopes=("provision:write",)),
        "own",
        403,
    ),
]


@cases(("rule", "key", "target", "status"), VIEW_RULES)
async def test_device_get_rule(
    config: Config, rpc: RpcClient, rule: str, key: Key, target: str, status: int
) -> None:
    world, secret = await world_and_key(config, rpc, key)
    reply = await rpc.call("device/get", {"deviceId": world[target]}, key=secret)
    assert reply["status"] == status, reply
    if status == 200:
        assert reply["body"]["deviceId"] == world[target]
    if status == 404:
        assert reply["error"]["code"] == "device_not_found"


LIST_RULES: list[tuple[str, Key, int, set[str]]] = [
    ("org key lists its whole org", ORG_KEY, 200, {"own", "other"}),
    ("user OWN_DEVICES_VIEW lists only own devices", Key(permissions=(OWN,)), 200, {"own"}),
    ("user ORG_DEVICES_VIEW lists the whole org", Key(permissions=(ORGV,)), 200, {"own", "other"}),
    ("user without a view permission is refused", Key(permissions=(PD, OVU)), 403, set()),
    (
        "key without devices:read scope is refused",
        Key(None, scopes=("provision:write",)),
        403,
        set(),
    ),
]


@cases(("rule", "key", "status", "visible"), LIST_RULES)
async def test_device_list_rule(
    config: Config, rpc: RpcClient, rule: str, key: Key, status: int, visible: set[str]
) -> None:
    world, secret = await world_and_key(config, rpc, key)
    reply = await rpc.call("device/list", {}, key=secret)
    assert reply["status"] == status, reply
    if status == 200:
        got = {d["deviceId"] for d in reply["body"]["devices"]}
        assert got == {world[name] for name in visible}


# --- helpers


def _count(config: Config) -> int:
    return int(rows(config, "SELECT COUNT(*) FROM devices")[0][0])


def _tokens(config: Config) -> int:
    return int(rows(config, "SELECT COUNT(*) FROM provision_tokens")[0][0])


def _owner_of(config: Config, device_id: int) -> tuple[int, int]:
    (row,) = rows(config, "SELECT org_id, owner_id FROM devices WHERE id = ?", (device_id,))
    return row[0], row[1]
