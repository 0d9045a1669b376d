"""SQLite store: one connection on one worker thread, migrations at open.

The event loop never touches the database: every call is a plain function of
a `Database` that runs on the store's own thread, in order. One writer thread
also means SQLite never sees two writers from this process.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import sqlite_utils

from provisiond import metrics
from provisiond.errors import StoreUnavailable

T = TypeVar("T")


@dataclass(frozen=True)
class Migration:
    """A named schema step; names are recorded so each runs exactly once."""

    name: str
    sql: str


def connect(path: Path | str, *, synchronous: str = "normal") -> sqlite_utils.Database:
    """Open the database with the pragmas the daemon and CLI rely on."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write
    # transaction takes the lock up front instead of failing on upgrade.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return sqlite_utils.Database(conn)


def migrate(db: sqlite_utils.Database, migrations: Sequence[Migration]) -> list[str]:
    """Apply migrations not yet recorded; returns the names applied now."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {row[0] for row in db.execute("SELECT name FROM schema_migrations").fetchall()}
    applied: list[str] = []
    for migration in migrations:
        if migration.name in done:
            continue
        with transaction(db):
            for statement in _statements(migration.sql):
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                [migration.name, time.time()],
            )
        applied.append(migration.name)
    return applied


def _statements(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";") if s.strip()]


class transaction:
    """`with transaction(db):` — BEGIN IMMEDIATE, COMMIT or ROLLBACK."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def __enter__(self) -> sqlite_utils.Database:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full) must not leave the connection inside
                # a transaction, or every later BEGIN would fail too.
                if self.db.conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        elif self.db.conn.in_transaction:
            # SQLite may already have rolled back itself (e.g. on SQLITE_FULL).
            self.db.execute("ROLLBACK")


def data_version(db: sqlite_utils.Database) -> int:
    """Moves whenever another connection commits (SQLite's `PRAGMA data_version`)."""
    return int(db.execute("PRAGMA data_version").fetchone()[0])


class Store:
    """Async front of the database; `call` and `write` run functions on its thread."""

    def __init__(self, path: Path | str, *, synchronous: str = "normal") -> None:
        self.path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite_utils.Database | None = None

    async def open(self, migrations: Sequence[Migration]) -> list[str]:
        def _open() -> list[str]:
            self._db = connect(self.path, synchronous=self._synchronous)
            return migrate(self._db, migrations)

        return await self._run(_open)

    async def call(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn(db)` on the store thread (reads, or writes that manage their own transaction)."""
        return await self._run(lambda: fn(self._require()))

    async def write(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn(db)` inside one write transaction; an exception rolls it back."""

        def _write() -> T:
            db = self._require()
            with transaction(db):
                return fn(db)

        return await self._run(_write)

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.conn.close()
                self._db = None

        try:
            await self._run(_close)
        finally:
            self._executor.shutdown(wait=True)

    def _require(self) -> sqlite_utils.Database:
        if self._db is None:
            raise StoreUnavailable("store is not open")
        return self._db

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await metrics.timed(self, loop.run_in_executor(self._executor, fn))
        except sqlite3.OperationalError as exc:
            # Disk full, read-only file, lock timeout: the caller gets a 503, the
            # daemon keeps running and the next call tries again.
            raise StoreUnavailable(f"store unavailable: {exc}") from exc
        except RuntimeError as exc:
            if "shutdown" in str(exc):
                raise StoreUnavailable("store is closed") from exc
            raise
