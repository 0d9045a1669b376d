"""Grant signing keys kept in the store, so every daemon of a fleet has the same ones.

Used when the store is PostgreSQL (`keyvault.keys_in_store`): several daemons
on hosts with no shared file system sign grants, and a request may land on
any of them, so each must sign with a key that every other one publishes
(`wifi-config/keys`, the activation reply). SQLite keeps the file ring of
`signing.KeyRing`, unchanged.

This module owns the `signing_keys` table. A row is one key: its private
half sealed under the KEK (`keyvault`), never in clear; `created_at`, when it
was published; `sign_from`, when it starts signing; `verify_until`, when it
stops being published (NULL: the newest key, open-ended).

The rule that keeps daemons consistent without talking to each other:

- every daemon publishes every row whose `verify_until` has not passed, the
  ones not yet signing included;
- the signing key at time t is the row with the latest `sign_from <= t`, so
  the switch needs no second write and happens on every daemon at once;
- `rotate` inserts the new key with `sign_from = now + propagation`, and gives
  every open-ended key `verify_until = sign_from + MAX_GRANT_LIFETIME`, so the
  last grant the old key signs expires before it stops being published;
- each daemon re-reads the table every `refresh_interval(propagation)`, and
  refuses to sign or publish (503 `keys_stale`) when it has not managed to for
  `stale_after(propagation)`: a daemon still publishing at `sign_from` read
  the table after the rotation committed, so it publishes the new key. What
  is left of the propagation delay covers clock skew between hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import sqlite_utils
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisiond.errors import ConfigError
from provisiond.keyvault import KeyEncryptionKey
from provisiond.store import Migration
from provisiond.wifi.crypto import MAX_GRANT_LIFETIME
from provisiond.wifi.signing import KeyRing, SigningKey

MIGRATIONS: list[Migration] = [
    Migration(
        "wifi-2-signing-keys",
        """
        CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            alg TEXT NOT NULL,
            sealed_key BLOB NOT NULL,
            kek_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            sign_from REAL NOT NULL,
            verify_until REAL
        );
        """,
    ),
]

# Re-reading a handful of rows is cheap; more often than this buys nothing.
MAX_REFRESH_SECONDS: Final = 5.0


def refresh_interval(propagation: float) -> float:
    """How often a daemon re-reads the table."""
    return min(MAX_REFRESH_SECONDS, propagation / 10)


def stale_after(propagation: float) -> float:
    """Unrefreshed for this long, a daemon may miss a key the others sign with: it stops."""
    return propagation / 2


class StoredKeyCorrupt(ConfigError):
    """A row does not hold the key its kid names (or not a usable one)."""

    def __init__(self, kid: str, reason: str) -> None:
        super().__init__(f"grant signing key {kid} in the store: {reason}")
        self.kid = kid
        self.reason = reason


@dataclass(frozen=True)
class StoredKey:
    """A key as the store has it: `key.verify_until` from its row, and when it signs."""

    key: SigningKey
    sign_from: float


@dataclass(frozen=True)
class Rotation:
    """What `rotate` did: the new kid, when it signs, and the keys it retires (kid, until)."""

    kid: str
    sign_from: float
    retiring: list[tuple[str, float]]


class StoredRing:
    """The store's keys as one daemon loaded them; which one signs depends on the clock."""

    def __init__(self, keys: Sequence[StoredKey], *, clock: Callable[[], float]) -> None:
        if not keys:
            raise ValueError("a stored ring needs at least one key")
        self._keys = sorted(keys, key=lambda k: k.sign_from, reverse=True)
        self._clock = clock

    @property
    def active(self) -> SigningKey:
        """The key with the latest `sign_from` that has come."""
        now = self._clock()
        for stored in self._keys:
            if stored.sign_from <= now:
                return stored.key
        # Only on a host whose clock is behind the one that made the first key.
        return self._keys[-1].key

    @property
    def keys(self) -> list[SigningKey]:
        return [k.key for k in self._keys]

    @property
    def stored(self) -> list[StoredKey]:
        return list(self._keys)

    def get(self, kid: str) -> SigningKey | None:
        return next((k.key for k in self._keys if k.key.kid == kid), None)

    def verification_jwks(self, now: float) -> list[dict[str, Any]]:
        """Every key still published at `now`, the signing one first, then newest first."""
        active = self.active
        rest = [k.key for k in self._keys if k.key.kid != active.kid]
        return [k.public_jwk() for k in [active, *rest] if k.verifies_at(now)]


# --------------------------------------------------------------------------- store functions


def _label(kid: str) -> str:
    return f"grant signing key {kid}"


def _insert(
    db: sqlite_utils.Database,
    kek: KeyEncryptionKey,
    key: SigningKey,
    *,
    sign_from: float,
    verify_until: float | None,
) -> None:
    der = key.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    db.execute(
        "INSERT INTO signing_keys"
        " (kid, alg, sealed_key, kek_id, created_at, sign_from, verify_until)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            key.kid,
            key.alg,
            kek.seal(_label(key.kid), der),
            kek.id,
            key.created_at,
            sign_from,
            verify_until,
        ],
    )


def reseal(db: sqlite_utils.Database, kek: KeyEncryptionKey) -> int:
    """Seal every key not sealed under `kek` under it (opened with `kek.previous`); how many.

    The keys themselves do not change, so neither does `version`: the daemons
    keep what they hold.
    """
    rows = db.execute("SELECT kid, sealed_key, kek_id FROM signing_keys ORDER BY kid").fetchall()
    moved = 0
    for kid, sealed, kek_id in rows:
        if kek_id == kek.id:
            continue
        der = kek.unseal(_label(kid), kek_id, bytes(sealed))
        db.execute(
            "UPDATE signing_keys SET sealed_key = ?, kek_id = ? WHERE kid = ?",
            [kek.seal(_label(kid), der), kek.id, kid],
        )
        moved += 1
    return moved


def version(db: sqlite_utils.Database) -> tuple[tuple[Any, ...], ...]:
    """What changes whenever the ring does (cheap: no key is unsealed)."""
    rows = db.execute(
        "SELECT kid, sign_from, verify_until FROM signing_keys ORDER BY kid"
    ).fetchall()
    return tuple(tuple(r) for r in rows)


def load(db: sqlite_utils.Database, kek: KeyEncryptionKey) -> list[StoredKey]:
    """Every key in the store, unsealed and checked against its kid."""
    rows = db.execute(
        "SELECT kid, alg, sealed_key, kek_id, created_at, sign_from, verify_until"
        " FROM signing_keys ORDER BY sign_from"
    ).fetchall()
    keys: list[StoredKey] = []
    for kid, alg, sealed, kek_id, created_at, sign_from, verify_until in rows:
        der = kek.unseal(_label(kid), kek_id, bytes(sealed))
        try:
            private = serialization.load_der_private_key(der, password=None)
        except ValueError:
            raise StoredKeyCorrupt(kid, "not a private key") from None
        if not isinstance(private, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise StoredKeyCorrupt(kid, "only Ed25519 and P-256 keys can sign grants")
        key = SigningKey.from_private_key(private, created_at=float(created_at))
        # The kid is a hash of the key: a mismatch means a row was tampered with.
        if key.kid != kid or key.alg != alg:
            raise StoredKeyCorrupt(kid, "the key does not match its kid")
        until = None if verify_until is None else float(verify_until)
        keys.append(StoredKey(replace(key, verify_until=until), float(sign_from)))
    return keys


def ensure(
    db: sqlite_utils.Database,
    kek: KeyEncryptionKey,
    alg: str,
    *,
    now: float,
    propagation: float,
    import_from: KeyRing | None = None,
) -> str | None:
    """In a write transaction, at a daemon's start: a ring of `alg` keys in the store.

    An empty table gets the file ring `import_from` (a gateway moving to a
    cluster keeps the key its devices pinned), else a new key that signs at
    once: nobody can have published anything else yet. A ring whose newest key
    is of another algorithm is rotated, as a file ring is. Returns what it did:
    "imported", "created", "rotated" or None.
    """
    newest = db.execute("SELECT alg FROM signing_keys ORDER BY sign_from DESC LIMIT 1").fetchone()
    if newest is None:
        if import_from is None:
            _insert(db, kek, SigningKey.generate(alg, now=now), sign_from=now, verify_until=None)
            return "created"
        _import(db, kek, import_from, now=now)
        newest = (import_from.active.alg,)
        if newest[0] == alg:
            return "imported"
    if newest[0] != alg:
        rotate(db, kek, now=now, propagation=propagation, alg=alg)
        return "rotated"
    return None


def _import(db: sqlite_utils.Database, kek: KeyEncryptionKey, ring: KeyRing, *, now: float) -> None:
    active = ring.active
    for key in ring.keys:
        if not key.verifies_at(now):
            continue
        # The file ring's active key keeps signing; the others only verify
        # until their time, as they did on the gateway.
        sign_from = min(active.created_at, now) if key is active else 0.0
        _insert(db, kek, key, sign_from=sign_from, verify_until=key.verify_until)


def rotate(
    db: sqlite_utils.Database,
    kek: KeyEncryptionKey,
    *,
    now: float,
    propagation: float,
    alg: str | None = None,
) -> Rotation:
    """In a write transaction: publish a new key now that signs `propagation` seconds later.

    Every stored key is unsealed first, so a KEK that differs from the one the
    daemons hold is refused before it could seal a key nobody else can open.
    """
    load(db, kek)
    newest = db.execute(
        "SELECT alg, sign_from FROM signing_keys ORDER BY sign_from DESC LIMIT 1"
    ).fetchone()
    if newest is None:
        if alg is None:
            raise ValueError("an empty ring needs the algorithm of its first key")
        key = SigningKey.generate(alg, now=now)
        _insert(db, kek, key, sign_from=now, verify_until=None)
        return Rotation(key.kid, now, [])
    # After the newest key's own start: two rotations in a row keep their order.
    sign_from = max(now, float(newest[1])) + propagation
    key = SigningKey.generate(alg or str(newest[0]), now=now)
    db.execute(
        "UPDATE signing_keys SET verify_until = ? WHERE verify_until IS NULL",
        [sign_from + MAX_GRANT_LIFETIME],
    )
    retiring = [
        (str(kid), float(until))
        for kid, until in db.execute(
            "SELECT kid, verify_until FROM signing_keys WHERE verify_until > ? ORDER BY sign_from",
            [now],
        ).fetchall()
    ]
    _insert(db, kek, key, sign_from=sign_from, verify_until=None)
    return Rotation(key.kid, sign_from, retiring)


def prune(db: sqlite_utils.Database, now: float) -> list[str]:
    """Delete keys no longer published; returns their kids."""
    kids = [
        str(r[0])
        for r in db.execute(
            "SELECT kid FROM signing_keys WHERE verify_until <= ?", [now]
        ).fetchall()
    ]
    if kids:
        db.execute("DELETE FROM signing_keys WHERE verify_until <= ?", [now])
    return kids
