"""Helpers for the provisioning tests: device keys, a movable clock, store reads."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from provisiond.clock import Clock
from provisiond.config import Config
from provisiond.wifi.crypto import b64url_encode
from support import RpcClient, open_db, remember_secret, seed_key

ALL_SCOPES = ("devices:read", "devices:write", "provision:write", "daemon:read")


class FakeClock(Clock):
    """Wall time that a test can move forward; monotonic time stays real."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return super().now() + self.offset


def device_public_key() -> str:
    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return b64url_encode(raw)


def rows(config: Config, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = open_db(config)
    try:
        return [tuple(r) for r in db.execute(sql, list(params)).fetchall()]
    finally:
        db.conn.close()


def token_rows(config: Config, device_id: int) -> list[tuple[Any, ...]]:
    """(hash, used_at, revoked_at, expires_at) of the device's tokens, oldest first."""
    return rows(
        config,
        "SELECT hash, used_at, revoked_at, expires_at FROM provision_tokens"
        " WHERE device_id = ? ORDER BY created_at, rowid",
        (device_id,),
    )


def count(config: Config, table: str) -> int:
    return int(rows(config, f"SELECT COUNT(*) FROM {table}")[0][0])


def org_key(config: Config, org: int = 1, users: tuple[int, ...] = (10,)) -> str:
    return seed_key(config, org=org, users=users, scopes=ALL_SCOPES)[1]


async def provision(rpc: RpcClient, key: str, org: int = 1, owner: int = 10) -> tuple[str, int]:
    reply = await rpc.call("provision/token", {"orgId": org, "ownerId": owner}, key=key)
    assert reply["status"] == 200, reply
    return remember_secret(reply["body"]["token"]), reply["body"]["deviceId"]


async def activate(
    rpc: RpcClient,
    token: str,
    *,
    capabilities: int = 0x02,
    public_key: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {
        "token": token,
        "capabilities": capabilities,
        "public_key": public_key or device_public_key(),
        **extra,
    }
    return await rpc.call("device/activate", body)
