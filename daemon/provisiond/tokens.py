"""Provision tokens (docs/protocol.md §6): issued, revoked, consumed; stored only as SHA-256.

A token is 32 characters of `[A-Za-z0-9]` from `secrets` (~190 bits), which
is why an unsalted SHA-256 is enough: nobody can enumerate that space, and a
hash lookup lets activation find the token without knowing the device.

Every function here is a plain `fn(db, ...)` for the store thread (or the
CLI); the caller owns the transaction. A device has at most one token that is
neither used nor revoked — `issue` revokes the earlier ones in the same
transaction, and the partial unique index below makes the database refuse
anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlite_utils

from provisiond.auth import hash_secret, random_string
from provisiond.clock import iso_utc, iso_utc_or_none
from provisiond.errors import Gone, Unauthorized
from provisiond.store import Migration, dialect

# IF NOT EXISTS: databases made before this table moved here got it from
# the devices migrations (see devices.py).
MIGRATIONS: list[Migration] = [
    Migration(
        "tokens-1",
        """
        CREATE TABLE IF NOT EXISTS provision_tokens (
            hash TEXT PRIMARY KEY,
            device_id INTEGER NOT NULL REFERENCES devices(id),
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL,
            revoked_at REAL
        );
        CREATE INDEX IF NOT EXISTS provision_tokens_device ON provision_tokens(device_id);
        CREATE UNIQUE INDEX IF NOT EXISTS provision_tokens_one_open
            ON provision_tokens(device_id) WHERE used_at IS NULL AND revoked_at IS NULL;
        """,
    ),
]

TOKEN_LENGTH = 32
# Longer than any token we issue, so a client's over-long field is a 400 naming
# it rather than a slow hash of whatever it sent.
MAX_TOKEN_LENGTH = 64


@dataclass(frozen=True)
class TokenRecord:
    device_id: int
    created_at: float
    expires_at: float
    used_at: float | None
    revoked_at: float | None

    def state(self, now: float) -> str:
        if self.used_at is not None:
            return "used"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        return "live"


def new_token() -> str:
    return random_string(TOKEN_LENGTH)


def issue(
    db: sqlite_utils.Database,
    device_id: int,
    *,
    now: float,
    lifetime: float,
    new_device: bool = False,
) -> str:
    """Revoke the device's earlier tokens and store a new one; returns the token (never stored).

    `new_device`: created in this transaction, so it has no earlier token to revoke.
    """
    token = new_token()
    row = [hash_secret(token), device_id, now, now + lifetime]
    if new_device:
        db.execute(_INSERT, row)
        return token
    if dialect(db) == "postgresql":
        # One statement, not two: on PostgreSQL every statement costs the
        # daemon and the server a message each way. The aggregate over the
        # UPDATE's rows makes it run before the INSERT (an unreferenced
        # data-modifying WITH would run after it and meet the one-open index).
        db.execute(
            f"WITH revoked AS ({_REVOKE} RETURNING 1)"  # noqa: S608 - a constant
            " INSERT INTO provision_tokens (hash, device_id, created_at, expires_at)"
            " SELECT ?, ?, ?, ? FROM (SELECT COUNT(*) FROM revoked) AS done",
            [now, device_id, *row],
        )
        return token
    db.execute(_REVOKE, [now, device_id])
    db.execute(_INSERT, row)
    return token


def revoke_unused(db: sqlite_utils.Database, device_id: int, *, now: float) -> int:
    """Revoke every token of the device not yet used (expired ones too); returns how many."""
    return int(db.execute(_REVOKE, [now, device_id]).rowcount)


_INSERT = (
    "INSERT INTO provision_tokens (hash, device_id, created_at, expires_at) VALUES (?, ?, ?, ?)"
)
_REVOKE = (
    "UPDATE provision_tokens SET revoked_at = ?"
    " WHERE device_id = ? AND used_at IS NULL AND revoked_at IS NULL"
)


def find(db: sqlite_utils.Database, token: str) -> TokenRecord | None:
    row = db.execute(
        "SELECT device_id, created_at, expires_at, used_at, revoked_at FROM provision_tokens"
        " WHERE hash = ?",
        [hash_secret(token)],
    ).fetchone()
    return None if row is None else TokenRecord(*row)


def require_usable(record: TokenRecord | None, now: float) -> TokenRecord:
    """401 for a token we never issued, 410 for one that was and is no more."""
    if record is None:
        raise Unauthorized("unknown provision token", code="unknown_token", field="token")
    state = record.state(now)
    if state == "used":
        raise Gone("provision token was already used", code="token_used", field="token")
    if state == "revoked":
        raise Gone("provision token was revoked", code="token_revoked", field="token")
    if state == "expired":
        raise Gone("provision token has expired", code="token_expired", field="token")
    return record


def consume(db: sqlite_utils.Database, token: str, *, now: float) -> int:
    """Mark the token used (inside the caller's write transaction); returns its device id."""
    record = require_usable(find(db, token), now)
    db.execute("UPDATE provision_tokens SET used_at = ? WHERE hash = ?", [now, hash_secret(token)])
    return record.device_id


def history(db: sqlite_utils.Database, device_id: int, *, now: float) -> list[dict[str, Any]]:
    """The device's tokens for operators: times and state only, never the hash."""
    rows = db.execute(
        "SELECT device_id, created_at, expires_at, used_at, revoked_at FROM provision_tokens"
        " WHERE device_id = ? ORDER BY created_at, rowid",
        [device_id],
    ).fetchall()
    out: list[dict[str, Any]] = []
    for row in rows:
        rec = TokenRecord(*row)
        out.append(
            {
                "state": rec.state(now),
                "created_at": iso_utc(rec.created_at),
                "expires_at": iso_utc(rec.expires_at),
                "used_at": iso_utc_or_none(rec.used_at),
                "revoked_at": iso_utc_or_none(rec.revoked_at),
            }
        )
    return out
