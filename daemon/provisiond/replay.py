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
import itertools
import os
from collections.abc import Callable
from functools import partial

import sqlite_utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from provisiond.clock import Clock
from provisiond.errors import StoreUnavailable
from provisiond.logs import get_logger
from provisiond.store import Migration, Store, check_later, transaction

log = get_logger("provisiond.replay")

WINDOW_SECONDS = 600.0
_INFO = b"provisiond replay v1"
# How often stored replies older than the window are deleted.
PRUNE_SECONDS = 60.0
# How often the in-memory id set forgets ids older than the window.
RECENT_PRUNE_SECONDS = 0.2

MIGRATIONS: list[Migration] = [
    Migration(
        "core-2-replays",
        """
        CREATE TABLE replays (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            reply BLOB NOT NULL
        );
        CREATE INDEX replays_created ON replays(created_at);
        """,
    ),
]


def replay_id(principal_ref: str, operation: str, correlation: bytes) -> str:
    h = hashlib.sha256()
    for part in (principal_ref.encode(), operation.encode(), correlation):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.hexdigest()


def _key(secret: str, rid: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(rid), info=_INFO).derive(
        secret.encode("utf-8", "surrogatepass")  # as auth.hash_secret
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


def record(
    db: sqlite_utils.Database,
    rid: str,
    sealed: bytes,
    now: float,
    *,
    duplicate: Callable[[], Exception],
) -> None:
    """Record a reply in a write; raises `duplicate()` when one was already recorded.

    Read through `store.check_later`: a pipelined write is not kept waiting
    for the answer (the write fails as a whole if it comes back a duplicate).
    """
    # An expired record with the same id is overwritten: the window has passed.
    cur = db.execute(
        "INSERT INTO replays (id, created_at, reply) VALUES (?, ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET created_at = excluded.created_at, reply = excluded.reply"
        " WHERE replays.created_at <= ?",
        [rid, now, sealed, now - WINDOW_SECONDS],
    )

    def recorded() -> None:
        if cur.rowcount != 1:
            raise duplicate()

    check_later(db, recorded)


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
            for key in list(itertools.islice(self._ids, self.MAX_IDS // 10)):
                del self._ids[key]
        self._ids[self._key(rid)] = now

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and self._key(rid) in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def prune(self, now: float) -> None:
        # Insertion order is time order, so expired entries are at the front.
        # Only those are visited: this runs every 0.2 s, and copying the whole
        # set (up to millions of ids after a long flood) stalled the event loop
        # for every other caller each time.
        cutoff = now - WINDOW_SECONDS
        expired = [
            key for key, _ in itertools.takewhile(lambda item: item[1] <= cutoff, self._ids.items())
        ]
        for key in expired:
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


class Replays:
    """The one owner of idempotent replays in a running daemon.

    It keeps the stored replies (table `replays`), the in-memory set of
    recent ids that spares most requests a lookup, the batch of read-only
    replies not yet flushed, and the requests being handled right now, so a
    redelivery racing its original waits for the same answer.
    """

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self.buffer = ReplayBuffer(store)
        self.recent = RecentIds()
        self._running: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        """Learn which ids were recorded in the last window (also by an earlier run)."""
        now = self._clock.now()
        for rid in await self._store.call(lambda db: recent_ids(db, now)):
            self.recent.add(rid, now)

    async def run(self) -> None:
        """Upkeep: flush read-only replies, forget old ids, prune old rows."""
        last_prune = self._clock.monotonic()
        while True:
            await asyncio.sleep(min(ReplayBuffer.FLUSH_SECONDS, RECENT_PRUNE_SECONDS))
            try:
                await self.buffer.flush()
                self.recent.prune(self._clock.now())
                if self._clock.monotonic() - last_prune >= PRUNE_SECONDS:
                    last_prune = self._clock.monotonic()
                    await self._store.call(partial(prune, now=self._clock.now()))
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("replay.upkeep_failed")

    def may_exist(self, rid: str) -> bool:
        """False when no stored reply can exist for `rid`, so the store need not be asked."""
        return rid in self.recent

    async def load(self, rid: str, *, anywhere: bool = False) -> bytes | None:
        """The sealed reply recorded for `rid`, if any (buffered or stored).

        The store is asked only when this process saw the id recorded, unless
        `anywhere`: another process sharing the store may have recorded it.
        """
        sealed = self.buffer.get(rid)
        if sealed is not None or not (anywhere or self.may_exist(rid)):
            return sealed
        now = self._clock.now()
        return await self._store.call(lambda db: load(db, rid, now))

    def saved(self, rid: str) -> None:
        """A reply for `rid` was committed with its request's effect."""
        self.recent.add(rid, self._clock.now())

    def save_later(self, rid: str, secret: str, reply: bytes) -> None:
        """Keep the reply of a request that wrote nothing, to be flushed in a batch.

        Losing the last fraction of a second of these to a crash only means a
        repeat is answered afresh, with nothing created twice.
        """
        now = self._clock.now()
        self.buffer.add(rid, seal(secret, rid, reply), now)
        self.recent.add(rid, now)

    @property
    def in_progress(self) -> int:
        """How many requests with correlation data are being handled right now."""
        return len(self._running)

    def running(self, rid: str) -> asyncio.Future[bytes] | None:
        """The future of the same request being handled right now, if any."""
        return self._running.get(rid)

    def begin(self, rid: str) -> None:
        self._running[rid] = asyncio.get_running_loop().create_future()

    def finish(
        self, rid: str, reply: bytes | None = None, exc: BaseException | None = None
    ) -> None:
        """Hand the outcome to duplicates waiting on `rid` and forget it."""
        future = self._running.pop(rid, None)
        if future is None or future.done():
            return
        if exc is not None:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody has to be waiting
        else:
            assert reply is not None
            future.set_result(reply)

    async def flush(self) -> None:
        await self.buffer.flush()
