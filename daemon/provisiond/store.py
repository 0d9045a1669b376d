"""SQLite store: one connection on one worker thread, migrations at open.

The event loop never touches the database: every call is a plain function of
a `Database` that runs on the store's own thread, in order. One writer thread
also means SQLite never sees two writers from this process.

Group commit: write requests queued while the store thread is busy share one
transaction and one COMMIT, each inside its own SAVEPOINT (see `Store.write`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlite_utils

from provisiond.config import Config, read_secret, resolve_path
from provisiond.errors import StoreUnavailable

T = TypeVar("T")


@dataclass(frozen=True)
class Migration:
    """A named schema step; names are recorded so each runs exactly once."""

    name: str
    sql: str


def is_postgresql(target: Path | str) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def store_target(config: Config) -> tuple[str | Path, str | None]:
    """Where the configured store is (a SQLite path or a PostgreSQL URL) and its password."""
    url = config.store.url
    if is_postgresql(url):
        password = None
        if config.store.password_file:
            raw = read_secret(config, config.store.password_file, key="store.password_file")
            password = raw.decode().strip()
        return url, password
    path = url.removeprefix("sqlite://") if url else config.store.path
    return resolve_path(config, path), None


def open_database(
    target: Path | str, *, synchronous: str = "normal", password: str | None = None
) -> sqlite_utils.Database:
    """Connect to a SQLite file or a PostgreSQL URL (see `pg.py`)."""
    if is_postgresql(target):
        from provisiond import pg

        # pg.Database offers the part of sqlite_utils.Database the store functions use.
        return cast(sqlite_utils.Database, pg.connect(str(target), password=password))
    return connect(str(target).removeprefix("sqlite://"), synchronous=synchronous)


def dialect(db: sqlite_utils.Database) -> str:
    return str(getattr(db, "dialect", "sqlite"))


def table_names(db: sqlite_utils.Database) -> list[str]:
    if dialect(db) == "postgresql":
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY 1"
    return [str(r[0]) for r in db.execute(sql).fetchall()]


def table_columns(db: sqlite_utils.Database, table: str) -> list[str]:
    if dialect(db) == "postgresql":
        rows = db.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        return [str(r[0]) for r in rows]
    return [str(r[1]) for r in db.execute(f"PRAGMA table_info({table})").fetchall()]


def copy_finished(db: sqlite_utils.Database, tables: Sequence[str]) -> None:
    """After rows were copied in with their ids: generated ids continue after them.

    SQLite's AUTOINCREMENT follows explicit ids by itself; PostgreSQL's
    identity sequences do not.
    """
    if dialect(db) != "postgresql":
        return
    for table in tables:
        if "id" not in table_columns(db, table):
            continue
        seq = db.execute("SELECT pg_get_serial_sequence(?, 'id')", [table]).fetchone()
        if seq is not None and seq[0] is not None:
            db.execute(
                f"SELECT setval(?, COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)",  # noqa: S608 - a table name from the schema
                [seq[0]],
            )


def connect(path: Path | str, *, synchronous: str = "normal") -> sqlite_utils.Database:
    """Open the database with the pragmas the daemon and CLI rely on."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write
    # transaction takes the lock up front instead of failing on upgrade.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
    _wal(conn)
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return sqlite_utils.Database(conn)


def _wal(conn: sqlite3.Connection) -> None:
    # Switching a new file to WAL needs it alone, and SQLite does not wait on
    # its busy handler for that: two processes opening one new file at once
    # (two daemons starting together) would see "database is locked".
    deadline = time.monotonic() + 5.0
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def migrate(db: sqlite_utils.Database, migrations: Sequence[Migration]) -> list[str]:
    """Apply migrations not yet recorded; returns the names applied now."""
    # Under the write lock: PostgreSQL's CREATE TABLE IF NOT EXISTS is not
    # safe against a concurrent one (a unique violation in its catalog).
    with transaction(db):
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
        )
    done = {row[0] for row in db.execute("SELECT name FROM schema_migrations").fetchall()}
    applied: list[str] = []
    for migration in migrations:
        if migration.name in done:
            continue
        with transaction(db):
            # Asked again under the write lock: another process (a second
            # daemon starting on the same database) may have just applied it.
            if db.execute(
                "SELECT 1 FROM schema_migrations WHERE name = ?", [migration.name]
            ).fetchone():
                continue
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
            except Exception:
                # A failed COMMIT (disk full) must not leave the connection inside
                # a transaction, or every later BEGIN would fail too.
                if self.db.conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        elif self.db.conn.in_transaction:
            # SQLite may already have rolled back itself (e.g. on SQLITE_FULL).
            self.db.execute("ROLLBACK")


def settle(db: sqlite_utils.Database) -> None:
    """Wait until every statement sent so far has run; raises the first one's error.

    PostgreSQL's write transactions are pipelined (see `pg.py`), so a failed
    statement is reported at the next read of a result; a write of a batch
    settles before its savepoint is released, so its error stays its own.
    SQLite runs each statement at once: nothing to wait for.
    """
    if dialect(db) == "postgresql":
        db.conn.settle()  # type: ignore[attr-defined]


def check_later(db: sqlite_utils.Database, check: Callable[[], None]) -> None:
    """Run `check` (which reads results of statements sent before it) when they are in.

    At once, except inside a pipelined run of writes on PostgreSQL (see
    `Store.write`), where it runs after the run's one sync, before the
    COMMIT. An exception from it fails the write that asked, with nothing of
    that write kept; the check must not rely on what its write does after
    asking for it.
    """
    pending: list[Callable[[], None]] | None = getattr(db.conn, "deferred_checks", None)
    if pending is None:
        check()
    else:
        pending.append(check)


def take_ahead(db: sqlite_utils.Database, key: str, sql: str, params: Sequence[Any]) -> int:
    """The next of a block of values drawn ahead by `sql`, one per row (PostgreSQL only).

    For ids from a sequence that a write must know without waiting for the
    server; the block is per connection, and the next one is asked for in
    the background before this one runs out.
    """
    return int(db.conn.take_ahead(key, sql, params))  # type: ignore[attr-defined]


def data_version(db: sqlite_utils.Database) -> int:
    """Moves whenever another connection commits (SQLite's `PRAGMA data_version`)."""
    return int(db.execute("PRAGMA data_version").fetchone()[0])


# Writes committed together at most: bounds the latency one batch adds to the
# writes queued behind it and the reads waiting for the store thread.
MAX_BATCH = 256
_SAVEPOINT = "provisiond_write"
# How many pipelined writes' data changes go in one statement (see pg.py).
COMBINE_WRITES = 8
# Before a pipelined run of writes: its failure rolls back to here.
_RUN_SAVEPOINT = "provisiond_run"


@dataclass
class _Write:
    fn: Callable[[sqlite_utils.Database], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    pipelined: bool = False
    result: Any = None
    error: BaseException | None = None


@dataclass
class StoreStats:
    """How writes were committed (for `daemon/stats` and the tests)."""

    commits: int = 0
    writes: int = 0
    # Pipelined runs of writes sent back to the settled path (a failure in the run).
    pipelined_retries: int = 0
    largest_batch: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class Store:
    """Async front of the database; `call` and `write` run functions on its thread."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "normal",
        group_commit: bool = True,
        password: str | None = None,
        on_thread_start: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self._password = password
        self._synchronous = synchronous
        self.group_commit = group_commit
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="store", initializer=on_thread_start
        )
        self._db: sqlite_utils.Database | None = None
        # Writes waiting for the store thread; appended on the loop, taken on the thread.
        self._queue: deque[_Write] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        # After a pipelined run failed, the next batch settles every write:
        # a stream of failing requests costs at most one retry per two batches.
        self._settle_next = False
        self.stats = StoreStats()
        # Told how long each call took (seconds), e.g. by the metrics feature.
        self.on_call: Callable[[float], None] | None = None

    async def open(self, migrations: Sequence[Migration]) -> list[str]:
        def _open() -> list[str]:
            self._db = self._connect()
            return migrate(self._db, migrations)

        return await self._run(_open)

    async def call(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn(db)` on the store thread (reads, or writes that manage their own transaction)."""
        return await self._run(lambda: fn(self._require()))

    async def write(
        self, fn: Callable[[sqlite_utils.Database], T], *, pipelined: bool = False
    ) -> T:
        """Run `fn(db)` inside a write transaction; an exception rolls back its effect only.

        Returns (or raises) only once the transaction holding `fn`'s effect is
        committed (or known lost). Writes queued while the store thread is
        busy are committed together: each runs in its own SAVEPOINT, one that
        raises is rolled back to it and gets its own exception, and all share
        one COMMIT, whose failure fails every one of them. Nothing waits for a
        batch to fill: the batch is whatever queued while the thread was busy.

        `pipelined`: on PostgreSQL, consecutive such writes of a batch are
        sent without waiting for the server between them (one sync for the
        run instead of one or more per write), and the plain data changes of
        up to `COMBINE_WRITES` of them are sent as one statement. `fn` must
        then read results only through `check_later` (a read still works, it
        just waits); its data changes must not depend on the effects of its
        own or another pipelined write's (in one statement they see one
        snapshot; foreign keys are checked at its end, so a row may reference
        one inserted beside it; two parts changing one row make the statement
        fail, which the retry below absorbs); and it must be safe to run
        again: if anything in the run fails, the run is rolled back and each
        of its writes runs again on the settled path, one statement at a
        time, so every write gets the outcome it would have had there.
        """
        if not self.group_commit:

            def _write() -> T:
                db = self._require()
                with transaction(db):
                    result = fn(db)
                self._count(1)
                return result

            return await self._run(_write)
        loop = asyncio.get_running_loop()
        item = _Write(fn, loop.create_future(), loop, pipelined)
        with self._lock:
            self._queue.append(item)
            start = not self._scheduled
            self._scheduled = True
        if start:
            self._submit()
        result: T = await item.future
        return result

    def _submit(self) -> None:
        """Queue one batch job on the store thread (behind reads already waiting there)."""
        try:
            self._executor.submit(self._batch_job)
        except RuntimeError:
            with self._lock:
                orphans = list(self._queue)
                self._queue.clear()
                self._scheduled = False
            for item in orphans:
                item.error = StoreUnavailable("store is closed")
            _settle(orphans)

    def _batch_job(self) -> None:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
        try:
            self._commit(batch)
        except BaseException as exc:  # every caller must hear of it
            for item in batch:
                if item.error is None:
                    item.error = exc
        finally:
            _settle(batch)
            with self._lock:
                more = bool(self._queue)
                self._scheduled = more
            if more:
                # A new job, not a loop: reads queued meanwhile get their turn first.
                self._submit()

    def _commit(self, batch: list[_Write]) -> None:
        live = [item for item in batch if not item.future.cancelled()]
        if not live:
            return
        db = self._require()
        if len(live) == 1:
            # Alone: exactly the one transaction of old, no savepoint to pay for.
            item = live[0]
            try:
                with transaction(db):
                    item.result = item.fn(db)
            except Exception as exc:
                item.error = exc
                return
            self._count(1)
            return
        self._commit_together(db, live)

    def _commit_together(self, db: sqlite_utils.Database, items: list[_Write]) -> None:
        done: list[_Write] = []  # ran and released, awaiting the COMMIT
        postgresql = dialect(db) == "postgresql"
        settle_all, self._settle_next = self._settle_next, False
        db.execute("BEGIN IMMEDIATE")
        try:
            pending = list(items)
            pending.reverse()
            while pending:
                item = pending.pop()
                if postgresql and item.pipelined and not settle_all:
                    run = [item]
                    while pending and pending[-1].pipelined:
                        run.append(pending.pop())
                    if len(run) > 1:
                        if self._run_pipelined(db, run):
                            done.extend(run)
                            continue
                        self.stats.pipelined_retries += 1
                        settle_all = self._settle_next = True
                    # Alone, or sent back: each on the settled path below.
                    pending.extend(reversed(run[1:]))
                if not db.conn.in_transaction:
                    # SQLite rolled the whole transaction back by itself (a
                    # failed statement such as SQLITE_FULL): what ran before is
                    # gone, so those callers fail; the rest start over.
                    for lost in done:
                        lost.error = StoreUnavailable("store unavailable: transaction rolled back")
                    done.clear()
                    db.execute("BEGIN IMMEDIATE")
                db.execute(f"SAVEPOINT {_SAVEPOINT}")
                try:
                    item.result = item.fn(db)
                    settle(db)
                except Exception as exc:
                    item.error = exc
                    if db.conn.in_transaction:
                        db.execute(f"ROLLBACK TO {_SAVEPOINT}")
                        db.execute(f"RELEASE {_SAVEPOINT}")
                    continue
                if not postgresql:
                    # PostgreSQL keeps the savepoint until the COMMIT: a RELEASE
                    # costs a statement per write and frees nothing there (a
                    # released subtransaction keeps its XID), and ROLLBACK TO
                    # always finds the newest savepoint of the name, this write's.
                    db.execute(f"RELEASE {_SAVEPOINT}")
                done.append(item)
            if not db.conn.in_transaction:
                for lost in done:
                    lost.error = StoreUnavailable("store unavailable: transaction rolled back")
                return
            db.execute("COMMIT")
        except BaseException:
            # A failed BEGIN, SAVEPOINT or COMMIT: nothing of this batch is durable.
            if db.conn.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._count(len(done))

    def _run_pipelined(self, db: sqlite_utils.Database, run: list[_Write]) -> bool:
        """Send a run of pipelined writes whole; True if every one of them succeeded.

        One sync answers the whole run; the writes' result checks run after
        it. On any failure (a statement's error, a raising `fn` or check) the
        run is rolled back to its savepoint and False returned: the caller
        runs each write again on the settled path, where one write's failure
        is its own. A lost connection is raised, failing the batch.
        """
        conn = db.conn
        db.execute(f"SAVEPOINT {_RUN_SAVEPOINT}")
        checks: list[Callable[[], None]] = []
        try:
            conn.deferred_checks = checks  # type: ignore[attr-defined]
            conn.combine()  # type: ignore[attr-defined]
            for n, item in enumerate(run, 1):
                item.result = item.fn(db)
                if n % COMBINE_WRITES == 0:
                    conn.send_combined()  # type: ignore[attr-defined]
            conn.send_combined(stop=True)  # type: ignore[attr-defined]
            conn.deferred_checks = None  # type: ignore[attr-defined]
            settle(db)
            for check in checks:
                check()
        except Exception:
            if getattr(conn, "closed", False):
                raise
            for item in run:
                item.result = None
            db.execute(f"ROLLBACK TO {_RUN_SAVEPOINT}")
            return False
        finally:
            # Whatever ended the run, later writes check and send at once again.
            conn.deferred_checks = None  # type: ignore[attr-defined]
            conn.drop_combined()  # type: ignore[attr-defined]
        return True

    def _count(self, writes: int) -> None:
        if writes == 0:
            return
        stats = self.stats
        stats.commits += 1
        stats.writes += writes
        stats.largest_batch = max(stats.largest_batch, writes)
        stats.batch_sizes[writes] = stats.batch_sizes.get(writes, 0) + 1

    async def probe(self) -> dict[str, Any]:
        """Commit figures for `daemon/stats`."""
        s = self.stats
        return {
            "group_commit": self.group_commit,
            "commits": s.commits,
            "writes": s.writes,
            "largest_batch": s.largest_batch,
            "pipelined_retries": s.pipelined_retries,
        }

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.conn.close()
                self._db = None

        try:
            await self._run(_close)
        finally:
            self._executor.shutdown(wait=True)

    def _connect(self) -> sqlite_utils.Database:
        return open_database(self.path, synchronous=self._synchronous, password=self._password)

    def _require(self) -> sqlite_utils.Database:
        if self._db is None:
            raise StoreUnavailable("store is not open")
        if getattr(self._db.conn, "closed", False):
            # A PostgreSQL connection lost (server restart): this call reconnects;
            # the one that found it broken got a 503.
            self._db = self._connect()
        return self._db

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except BaseException as exc:
            error = _translate(exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            if self.on_call is not None:
                self.on_call(time.perf_counter() - started)


def _translate(exc: BaseException) -> BaseException:
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.OperationalError):
        return StoreUnavailable(f"store unavailable: {type(exc).__name__}")
    if isinstance(exc, sqlite3.OperationalError):
        # Disk full, read-only file, lock timeout: the caller gets a 503, the
        # daemon keeps running and the next call tries again.
        return StoreUnavailable(f"store unavailable: {exc}")
    if isinstance(exc, RuntimeError) and "shutdown" in str(exc):
        return StoreUnavailable("store is closed")
    return exc


def _settle(items: list[_Write]) -> None:
    """Hand each outcome to its caller's loop: one wake-up per loop, not per write."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
    for item in items:
        by_loop.setdefault(item.loop, []).append(item)
    for loop, group in by_loop.items():
        # A closed loop has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, group)


def _resolve(items: list[_Write]) -> None:
    for item in items:
        if item.future.done():
            continue  # its caller was cancelled
        if item.error is not None:
            error = _translate(item.error)
            if error is not item.error:
                error.__cause__ = item.error
            item.future.set_exception(error)
        else:
            item.future.set_result(item.result)
