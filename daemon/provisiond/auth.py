"""Organisations, users and API keys.

A key is `sk_live_` + 40 random characters, shown once when created and stored
only as its SHA-256. Lookup is by hash: the timing of an index search reveals
at most a prefix of a hash, never of the key, which is what makes it safe.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
import time
from dataclasses import dataclass

import sqlite_utils

from provisiond.errors import BadRequest, Conflict, NotFound, Unauthorized
from provisiond.store import Migration, transaction

MIGRATIONS: list[Migration] = [
    Migration(
        "core-1-auth",
        """
        CREATE TABLE orgs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        );
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            org_id INTEGER NOT NULL REFERENCES orgs(id),
            created_at REAL NOT NULL
        );
        CREATE INDEX users_org ON users(org_id);
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            org_id INTEGER NOT NULL REFERENCES orgs(id),
            user_id INTEGER REFERENCES users(id),
            scopes TEXT NOT NULL,
            permissions TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        """,
    ),
]

KEY_PREFIX = "sk_live_"
KEY_RANDOM_CHARS = 40
_ALPHABET = string.ascii_letters + string.digits

SCOPES = frozenset(
    {
        "devices:read",
        "devices:write",
        "provision:write",
        "daemon:read",
    }
)
PERMISSIONS = frozenset(
    {
        "PROVISION_DEVICES",
        "ORG_VIEW_USERS",
        "OWN_DEVICES_VIEW",
        "ORG_DEVICES_VIEW",
    }
)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: an API key, its organisation and perhaps a user."""

    key_id: str
    org_id: int
    user_id: int | None
    scopes: frozenset[str]
    permissions: frozenset[str]

    def as_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "org_id": self.org_id,
            "user_id": self.user_id,
            "scopes": sorted(self.scopes),
            "permissions": sorted(self.permissions),
        }


def hash_secret(secret: str) -> str:
    # surrogatepass: JSON can carry a lone UTF-16 surrogate, which strict UTF-8
    # refuses; such a secret was never issued, and must look up as unknown.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


# The largest multiple of the alphabet's size that fits a byte: bytes at or
# above it are skipped, so every character stays equally likely.
_BYTE_LIMIT = 256 - 256 % len(_ALPHABET)


def random_string(length: int) -> str:
    # One urandom read per string, not one per character: tokens are made on
    # the store thread inside write transactions, where 32 reads cost more
    # than the SQL.
    out: list[str] = []
    while len(out) < length:
        out.extend(
            _ALPHABET[b % len(_ALPHABET)]
            for b in secrets.token_bytes(length + 8)
            if b < _BYTE_LIMIT
        )
    return "".join(out[:length])


def looks_like_key(value: str) -> bool:
    return (
        value.startswith(KEY_PREFIX)
        and len(value) == len(KEY_PREFIX) + KEY_RANDOM_CHARS
        and all(c in _ALPHABET for c in value[len(KEY_PREFIX) :])
    )


# --- synchronous operations on a Database (used by the CLI and the store thread)


def create_org(db: sqlite_utils.Database, org_id: int, name: str = "") -> None:
    if org_id <= 0:
        raise BadRequest("organisation id must be positive", field="id")
    with transaction(db):
        if db.execute("SELECT 1 FROM orgs WHERE id = ?", [org_id]).fetchone():
            raise Conflict(f"organisation {org_id} already exists")
        db.execute(
            "INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)", [org_id, name, time.time()]
        )


# `user_org(db, user) == org` as a condition inside another owner's statement
# (a device created only for a user of its organisation, in one statement
# on PostgreSQL: devices.create_device); its parameters are (user_id, org_id).
USER_IN_ORG = "EXISTS (SELECT 1 FROM users WHERE id = ? AND org_id = ?)"


def user_org(db: sqlite_utils.Database, user_id: int) -> int | None:
    """The organisation of a user, or None for an unknown user."""
    row = db.execute("SELECT org_id FROM users WHERE id = ?", [user_id]).fetchone()
    return None if row is None else int(row[0])


def create_user(db: sqlite_utils.Database, org_id: int, user_id: int) -> None:
    if user_id <= 0:
        raise BadRequest("user id must be positive", field="id")
    with transaction(db):
        if not db.execute("SELECT 1 FROM orgs WHERE id = ?", [org_id]).fetchone():
            raise NotFound(f"organisation {org_id} does not exist")
        if db.execute("SELECT 1 FROM users WHERE id = ?", [user_id]).fetchone():
            raise Conflict(f"user {user_id} already exists")
        db.execute(
            "INSERT INTO users (id, org_id, created_at) VALUES (?, ?, ?)",
            [user_id, org_id, time.time()],
        )


def create_key(
    db: sqlite_utils.Database,
    *,
    org_id: int,
    user_id: int | None = None,
    scopes: frozenset[str] = frozenset(),
    permissions: frozenset[str] = frozenset(),
) -> tuple[str, str]:
    """Create a key; returns (key_id, secret). Only the hash is stored."""
    unknown_scopes = scopes - SCOPES
    if unknown_scopes:
        raise BadRequest(
            f"unknown scope {sorted(unknown_scopes)[0]!r}; known: {sorted(SCOPES)}", field="scope"
        )
    unknown_perms = permissions - PERMISSIONS
    if unknown_perms:
        raise BadRequest(
            f"unknown permission {sorted(unknown_perms)[0]!r}; known: {sorted(PERMISSIONS)}",
            field="permission",
        )
    secret = KEY_PREFIX + random_string(KEY_RANDOM_CHARS)
    key_id = "key_" + secrets.token_hex(6)
    with transaction(db):
        if not db.execute("SELECT 1 FROM orgs WHERE id = ?", [org_id]).fetchone():
            raise NotFound(f"organisation {org_id} does not exist")
        if user_id is not None:
            row = db.execute("SELECT org_id FROM users WHERE id = ?", [user_id]).fetchone()
            if row is None or row[0] != org_id:
                raise NotFound(f"user {user_id} is not a user of organisation {org_id}")
        db.execute(
            "INSERT INTO api_keys (id, hash, org_id, user_id, scopes, permissions, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                key_id,
                hash_secret(secret),
                org_id,
                user_id,
                json.dumps(sorted(scopes)),
                json.dumps(sorted(permissions)),
                time.time(),
            ],
        )
    return key_id, secret


def list_keys(db: sqlite_utils.Database) -> list[dict[str, object]]:
    rows = db.execute(
        "SELECT id, org_id, user_id, scopes, permissions, created_at, revoked_at FROM api_keys ORDER BY created_at"
    ).fetchall()
    return [
        {
            "id": r[0],
            "org_id": r[1],
            "user_id": r[2],
            "scopes": json.loads(r[3]),
            "permissions": json.loads(r[4]),
            "created_at": r[5],
            "revoked_at": r[6],
        }
        for r in rows
    ]


def revoke_key(db: sqlite_utils.Database, key_id: str) -> None:
    with transaction(db):
        cur = db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            [time.time(), key_id],
        )
        if cur.rowcount == 0:
            if db.execute("SELECT 1 FROM api_keys WHERE id = ?", [key_id]).fetchone():
                raise Conflict(f"key {key_id} is already revoked")
            raise NotFound(f"no key with id {key_id}")


def lookup_key(db: sqlite_utils.Database, secret: str) -> Principal:
    """Find the live key whose hash matches; raises Unauthorized otherwise."""
    if not looks_like_key(secret):
        raise Unauthorized("missing or malformed API key")
    row = db.execute(
        "SELECT id, org_id, user_id, scopes, permissions, revoked_at FROM api_keys WHERE hash = ?",
        [hash_secret(secret)],
    ).fetchone()
    # Unknown and revoked keys answer alike, so a caller cannot probe which keys existed.
    if row is None or row[5] is not None:
        raise Unauthorized("unknown or revoked API key")
    return Principal(
        key_id=row[0],
        org_id=row[1],
        user_id=row[2],
        scopes=frozenset(json.loads(row[3])),
        permissions=frozenset(json.loads(row[4])),
    )


class KeyCache:
    """Principals of keys seen recently, so a request needs no store trip.

    Keys are created and revoked by the CLI, another process; the watcher in
    `provisiond.runtime.caches` clears this cache when the store says another
    connection committed, so a revocation takes effect within one poll.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._by_hash: dict[str, Principal] = {}
        self.data_version: int | None = None

    def get(self, secret: str) -> Principal | None:
        return self._by_hash.get(hash_secret(secret))

    def put(self, secret: str, principal: Principal) -> None:
        if len(self._by_hash) >= self.MAX_ENTRIES:
            self._by_hash.clear()
        self._by_hash[hash_secret(secret)] = principal

    def observe(self, data_version: int) -> None:
        if data_version != self.data_version:
            self._by_hash.clear()
            self.data_version = data_version


def parse_bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized("missing authorization")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("authorization must be 'Bearer <key>'")
    return value.strip()
