"""Idempotent replays: the first reply to a request, kept for ten minutes.

A stored reply can hold secrets (a provision token, a session key). It is
sealed with AES-GCM under a key derived from the caller's own credential (the
API key or provision token), which the daemon stores only as a hash — so the
database file alone never yields a token, yet the same caller repeating the
same request gets the identical reply, also after a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import sqlite_utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from provisiond.errors import StoreUnavailable
from provisiond.logs import get_logger
from provisiond.store import Store, transaction

log = get_logger("provisiond.replay")

WINDOW_SECONDS = 600.0
_INFO = b"provisiond replay v1"


def replay_id(principal_ref: str, operation: str, correlation: bytes) -> str:
    h = hashlib.sha256()
    for part in (principal_ref.encode(), operation.encode(), correlation):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.hexdigest()


def _key(secret: str, rid: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(rid), info=_INFO).derive(
        secret.encode("utf-8")
    )


def seal(secret: str, rid: str, reply: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(_key(secret, rid)).encrypt(nonce, reply, rid.encode())


def unseal(secret: str, rid: str, blob: bytes) -> bytes | None:
    try:
        return AESGCM(_key(secret, rid)).decrypt(blob[:12], blob[12:], rid.encode())
    except (InvalidTag, ValueError):
        return None


def load(db: sqlite_utils.Database, rid: str, now: float) -> bytes | None:
    row = db.execute(
        "SELECT reply FROM replays WHERE id = ? AND created_at > ?", [rid, now - WINDOW_SECONDS]
    ).fetchone()
    return None if row is None else bytes(row[0])


def save(db: sqlite_utils.Database, rid: str, sealed: bytes, now: float) -> bool:
    """Record a reply; False when one was already recorded (a concurrent duplicate)."""
    # An expired record with the same id is overwritten: the window has passed.
    cur = db.execute(
        "INSERT INTO replays (id, created_at, reply) VALUES (?, ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET created_at = excluded.created_at, reply = excluded.reply"
        " WHERE replays.created_at <= ?",
        [rid, now, sealed, now - WINDOW_SECONDS],
    )
    return cur.rowcount == 1


def prune(db: sqlite_utils.Database, now: float) -> int:
    return db.execute("DELETE FROM replays WHERE created_at <= ?", [now - WINDOW_SECONDS]).rowcount


def recent_ids(db: sqlite_utils.Database, now: float) -> list[str]:
    return [
        r[0]
        for r in db.execute("SELECT id FROM replays WHERE created_at > ?", [now - WINDOW_SECONDS])
    ]


class RecentIds:
    """Which replay ids were recorded in the last window, as 64-bit prefixes.

    Most requests are new: when an id is not here, no stored reply can exist
    (in this process's store view), so the store is not asked. A false
    positive costs one lookup. Another process sharing the store may record
    ids this one never sees; for operations that write, the transactional
    insert of the reply (see `Request.write`) still catches the duplicate.
    """

    def __init__(self) -> None:
        self._ids: dict[int, float] = {}

    @staticmethod
    def _key(rid: str) -> int:
        return int(rid[:16], 16)

    MAX_IDS = 2_000_000

    def add(self, rid: str, now: float) -> None:
        if len(self._ids) >= self.MAX_IDS:
            # Bounded memory under a flood: forgetting the oldest ids only means
            # their repeats are looked up no more; writes stay exactly-once
            # through the transactional reply insert.
            for key in list(self._ids)[: self.MAX_IDS // 10]:
                del self._ids[key]
        self._ids[self._key(rid)] = now

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and self._key(rid) in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def prune(self, now: float) -> None:
        # Insertion order is time order, so expired entries are at the front.
        cutoff = now - WINDOW_SECONDS
        for key, at in list(self._ids.items()):
            if at > cutoff:
                break
            del self._ids[key]


class ReplayBuffer:
    """Sealed replies of operations that wrote nothing, saved to the store in batches.

    Looked up before the store, so a repeat arriving before the next flush is
    still a replay.
    """

    FLUSH_SECONDS = 0.2
    MAX_PENDING = 100_000

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[str, tuple[bytes, float]] = {}

    def add(self, rid: str, sealed: bytes, now: float) -> None:
        self._pending[rid] = (sealed, now)

    def get(self, rid: str) -> bytes | None:
        item = self._pending.get(rid)
        return None if item is None else item[0]

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}

        def write(db: sqlite_utils.Database) -> None:
            with transaction(db):
                db.conn.executemany(
                    "INSERT OR IGNORE INTO replays (id, created_at, reply) VALUES (?, ?, ?)",
                    [(rid, now, sealed) for rid, (sealed, now) in batch.items()],
                )

        try:
            await self._store.call(write)
        except StoreUnavailable:
            # Keep them for the next try rather than forget them, within a bound:
            # a store down for long must not grow memory without end.
            if len(self._pending) + len(batch) <= self.MAX_PENDING:
                self._pending = {**batch, **self._pending}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception:
                log.exception("replay.flush_failed")
