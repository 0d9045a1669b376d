"""PostgreSQL dialect of the store: the subset of `sqlite_utils.Database` the
store functions use, over one psycopg 3 connection.

The owning modules keep one set of SQL, written for SQLite. This layer is the
only place that knows the differences, and it keeps them few:

- placeholders `?` become `%s` (and a literal `%` is escaped);
- `INSERT OR IGNORE` becomes `INSERT ... ON CONFLICT DO NOTHING`;
- DDL types: `INTEGER` → `BIGINT` (`... AUTOINCREMENT` → an identity
  column), `REAL` → `DOUBLE PRECISION`, `BLOB` → `BYTEA`;
- `BEGIN IMMEDIATE` takes one transaction-scoped advisory lock, so write
  transactions are serialised across every process on the database exactly
  as SQLite serialises its writers (the single-winner rules of tokens,
  re-provisioning and replays rely on that); group commit amortises the lock;
- `COMMIT` of such a transaction first sends `NOTIFY`, and
  `PRAGMA data_version` answers a counter of notifications from other
  connections: the caches' watcher (`caches.py`) polls it every 0.2 s, on
  both dialects alike;
- Python booleans are stored as integers, as SQLite does;
- `rowid` (a tie-break in ORDER BY) becomes `ctid`;
- a write transaction runs in psycopg's pipeline mode: statements are sent
  without waiting, and the connection waits for the server only when a
  caller reads a result (`fetchone`, `rowcount`, ...), at `settle()` and at
  COMMIT. Every statement would otherwise be a network round trip of its
  own (seven per provision in a group-commit batch, counting the savepoint
  and its release); pipelined, it is the three whose results it reads. A
  failing statement's error is therefore raised at the next of those points,
  which the store's group commit places inside each write (`store.settle`);
- a write the caller marks as pipelined (`Store.write(fn, pipelined=True)`)
  is not settled on its own: a run of them in one batch is sent whole and
  answered at one sync, their result checks (`store.check_later`) run after
  it, and any failure sends the run back to the settled path (see
  `Store._run_pipelined`);
- in a pipelined run, the writes' plain INSERT/UPDATE/DELETE statements
  are held and sent as ONE statement per few writes (data-modifying
  `WITH`s, each answering its row count): eight provisions are one
  statement, not 24. Once nothing waits, the CPU per statement (psycopg's
  Python, a send and a poll, the server's own round) is what bounds
  PostgreSQL here. The parts see one snapshot, which the pipelined write's
  contract allows (`Store.write`);
- values drawn ahead from a sequence (`take_ahead`: device ids) live with
  the connection, so a reconnect starts a new block (the old one's unused
  values are a gap, as a rolled-back INSERT's id is on PostgreSQL anyway).
  The next block is asked for inside the pipeline before this one runs out,
  so drawing it rarely waits.
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import Dumper

CHANNEL = "provisiond_store"
# Any constant shared by every process: the key of the one write lock.
WRITE_LOCK_KEY = 0x70726F76  # "prov"


class _BoolAsInt(Dumper):
    """SQLite stores True as 1; columns such as `presence.online` are integers."""

    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: bool) -> bytes:
        return b"1" if obj else b"0"


class Cursor:
    """What `db.execute` returns: rows as tuples, `rowcount`, iteration.

    Inside a pipelined transaction its result may not have arrived yet: any
    read first waits for it (`Connection.wait_for`).
    """

    def __init__(
        self,
        cur: psycopg.Cursor[Any] | None,
        rows: list[tuple[Any, ...]] | None = None,
        *,
        conn: Connection | None = None,
        seq: int = 0,
    ) -> None:
        self._cur = cur
        self._rows = rows
        self._conn = conn
        self._seq = seq

    def _arrived(self) -> psycopg.Cursor[Any] | None:
        if self._conn is not None:
            self._conn.wait_for(self._seq)
            self._conn = None
        return self._cur

    @property
    def rowcount(self) -> int:
        cur = self._arrived()
        return -1 if cur is None else cur.rowcount

    @property
    def lastrowid(self) -> None:
        # Use `INSERT ... RETURNING id` instead: it works on both dialects.
        return None

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._rows is not None:
            return self._rows.pop(0) if self._rows else None
        cur = self._arrived()
        if cur is None or cur.description is None:
            return None
        return cur.fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self._rows is not None:
            rows, self._rows = self._rows, []
            return rows
        cur = self._arrived()
        if cur is None or cur.description is None:
            return []
        return cur.fetchall()

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class _Combined:
    """The row counts of a statement made of several (see `Connection.combine`)."""

    def __init__(self, cursor: Cursor) -> None:
        self._cursor = cursor
        self._counts: tuple[Any, ...] | None = None

    def count(self, index: int) -> int:
        if self._counts is None:
            self._counts = self._cursor.fetchone() or ()
        return int(self._counts[index])


class _Part(Cursor):
    """What `execute` returns for a statement held to be combined: its row count."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(None)
        self._owner = conn
        self.direct: Cursor | None = None
        self.combined: _Combined | None = None
        self.index = 0

    @property
    def rowcount(self) -> int:
        if self.direct is None and self.combined is None:
            self._owner.send_combined()
        if self.direct is not None:
            return self.direct.rowcount
        assert self.combined is not None
        return self.combined.count(self.index)

    def fetchone(self) -> tuple[Any, ...] | None:
        return None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return []


# How few values left in a `take_ahead` block make it ask for the next one.
AHEAD_LOW = 16


class Connection:
    """The `db.conn` of the PostgreSQL dialect (`execute`, `executemany`, `in_transaction`)."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        # Moves on every NOTIFY from another connection (see `data_version`).
        self.data_version = 0
        self._pid = raw.info.backend_pid
        self._write_tx = False
        # The pipeline of the open write transaction, if any; statements sent
        # in it are numbered, and `_synced` is the last one known to be answered.
        self._pipeline: psycopg.Pipeline | None = None
        self._pipeline_cm: contextlib.AbstractContextManager[psycopg.Pipeline] | None = None
        self._sent = 0
        self._synced = 0
        # Set by the store while a pipelined run of writes is sent: result
        # checks wait here until the run's one sync (`store.check_later`).
        self.deferred_checks: list[Callable[[], None]] | None = None
        # Statements held to be sent as one (`combine`), or None.
        self._parts: list[tuple[str, Sequence[Any], _Part]] | None = None
        self._ahead: dict[str, deque[int]] = {}
        self._refills: dict[str, Cursor] = {}
        raw.adapters.register_dumper(bool, _BoolAsInt)
        raw.add_notify_handler(self._notified)
        raw.execute(f"LISTEN {CHANNEL}")

    def _notified(self, notify: psycopg.Notify) -> None:
        if notify.pid != self._pid:
            self.data_version += 1

    @property
    def in_transaction(self) -> bool:
        # While pipelined the server's status may lag what was sent, and
        # PostgreSQL never ends a transaction by itself (it only marks it failed).
        return self._pipeline is not None or self.raw.info.transaction_status in (
            pq.TransactionStatus.INTRANS,
            pq.TransactionStatus.INERROR,
        )

    @property
    def closed(self) -> bool:
        return self.raw.closed or self.raw.broken

    def settle(self) -> None:
        """Wait for every statement sent so far; raises the first one's error."""
        self.wait_for(self._sent)

    def wait_for(self, seq: int) -> None:
        if seq <= self._synced or self._pipeline is None:
            return
        self._synced = self._sent
        self._pipeline.sync()

    def take_ahead(self, key: str, sql: str, params: Sequence[Any]) -> int:
        """The next value of a block drawn ahead under `key` by `sql` (one value per row)."""
        block = self._ahead.setdefault(key, deque())
        if len(block) <= AHEAD_LOW and key not in self._refills and self._pipeline is not None:
            # Answered by a later sync of the pipeline, usually before it is needed.
            self._refills[key] = self.execute(sql, params)
        if not block:
            pending = self._refills.pop(key, None)
            # A refill sent behind a statement that failed was never run: it has no rows.
            rows = [] if pending is None else pending.fetchall()
            if not rows:
                rows = self.execute(sql, params).fetchall()
            block.extend(sorted(int(r[0]) for r in rows))
        return block.popleft()

    def combine(self) -> None:
        """Hold plain INSERT/UPDATE/DELETE statements from now on, to be sent as one.

        With parameters only: a statement without them keeps its literal `%`.

        A statement of another kind, or a read of a held one's row count,
        sends what is held first; `send_combined` sends the rest and stops.
        """
        self._parts = []

    def send_combined(self, *, stop: bool = False) -> None:
        parts = self._parts
        self._parts = None if stop else []
        if not parts:
            return
        if len(parts) == 1:
            sql, params, part = parts[0]
            part.direct = self._send(sql, params)
            return
        ctes = ", ".join(f"s{i} AS ({sql} RETURNING 1)" for i, (sql, _, _) in enumerate(parts))
        counts = ", ".join(f"(SELECT count(*) FROM s{i})" for i in range(len(parts)))  # noqa: S608 - generated names
        combined = _Combined(
            self._send(f"WITH {ctes} SELECT {counts}", [p for _, ps, _ in parts for p in ps])
        )
        for i, (_, _, part) in enumerate(parts):
            part.combined = combined
            part.index = i

    def drop_combined(self) -> None:
        """Stop holding statements; what is held is never sent (its write failed)."""
        self._parts = None

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Cursor:
        command = sql.strip().rstrip(";").upper()
        if command == "BEGIN IMMEDIATE":
            self._begin()
            return Cursor(None)
        if command == "COMMIT" and self._write_tx:
            self._write_tx = False
            self._send(f"NOTIFY {CHANNEL}")
            self._send("COMMIT")
            self._end_pipeline()
            return Cursor(None)
        if command == "COMMIT" or command.startswith("ROLLBACK"):
            return self._rollback_or_commit(sql, command)
        if command == "PRAGMA DATA_VERSION":
            # A round trip delivers the notifications waiting on the socket.
            self.raw.execute("SELECT 1")
            return Cursor(None, [(self.data_version,)])
        if command.startswith("PRAGMA"):
            return Cursor(None, [])
        # Without parameters psycopg does no placeholder processing, so `%` stays as is.
        statement = translate(sql, bool(params))
        if self._parts is not None:
            if params and _combinable(command):
                part = _Part(self)
                self._parts.append((statement.strip().rstrip(";"), params, part))
                return part
            self.send_combined()
        if self._pipeline is not None:
            return self._send(statement, params or None)
        cur = self.raw.execute(statement, params or None)
        if not self.in_transaction and command.startswith(("INSERT", "UPDATE", "DELETE")):
            # Committed on its own: other processes must hear of it as of any commit.
            self.raw.execute(f"NOTIFY {CHANNEL}")
        return Cursor(cur)

    def _begin(self) -> None:
        self._pipeline_cm = self.raw.pipeline()
        self._pipeline = self._pipeline_cm.__enter__()
        self._write_tx = True
        self._send("BEGIN")
        self._send("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK_KEY])

    def _send(self, sql: str, params: Sequence[Any] | None = None) -> Cursor:
        """One statement into the pipeline; its result is read when someone asks."""
        cur = self.raw.execute(sql, params)
        self._sent += 1
        return Cursor(cur, conn=self, seq=self._sent)

    def _rollback_or_commit(self, sql: str, command: str) -> Cursor:
        if self._pipeline is None:
            if command in ("COMMIT", "ROLLBACK"):
                self._write_tx = False
            return Cursor(self.raw.execute(sql))
        if command.startswith("ROLLBACK"):
            # What is rolled back may have failed unseen: its error must not
            # abort the rollback itself.
            with contextlib.suppress(psycopg.Error):
                self.settle()
        self._send(sql)
        if command in ("COMMIT", "ROLLBACK"):
            self._write_tx = False
            self._end_pipeline()
        elif command.startswith("ROLLBACK"):
            # psycopg forgets every prepared statement when it reads a
            # ROLLBACK's answer; a statement sent before that, by a name it
            # then deallocates, failed ("prepared statement does not exist").
            self.settle()
        return Cursor(None)

    def _end_pipeline(self) -> None:
        """Leave pipeline mode: waits for everything sent; raises the first error."""
        cm, self._pipeline_cm, self._pipeline = self._pipeline_cm, None, None
        self._synced = self._sent
        if cm is not None:
            cm.__exit__(None, None, None)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Cursor:
        if self._parts:
            self.send_combined()  # in order
        cur = self.raw.cursor()
        cur.executemany(translate(sql), list(seq))
        if not self.in_transaction:
            self.raw.execute(f"NOTIFY {CHANNEL}")
        return Cursor(cur)

    def close(self) -> None:
        self.raw.close()


class Database:
    """`sqlite_utils.Database`'s `execute` and `conn`, on PostgreSQL."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.conn = Connection(raw)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Cursor:
        return self.conn.execute(sql, params)


def connect(url: str, *, password: str | None = None) -> Database:
    """Open `url` (postgresql://user@host:port/db); the password never goes into the URL."""
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 10}
    if password is not None:
        kwargs["password"] = password
    # prepare_threshold: the daemon runs the same few statements all day long.
    raw = psycopg.connect(url, prepare_threshold=2, **kwargs)
    return Database(raw)


def _combinable(command: str) -> bool:
    """A statement that may be one part of a combined one: a plain data change."""
    return command.startswith(("INSERT", "UPDATE", "DELETE")) and "RETURNING" not in command


_INSERT_OR_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+", re.IGNORECASE)
_RETURNING = re.compile(r"\bRETURNING\b", re.IGNORECASE)
_DDL = re.compile(r"^\s*(CREATE\s+TABLE|ALTER\s+TABLE)", re.IGNORECASE)


@lru_cache(maxsize=1024)
def translate(sql: str, params: bool = True) -> str:
    """SQLite's SQL, as the store functions write it, in PostgreSQL's dialect."""
    out = sql.replace("%", "%%").replace("?", "%s") if params else sql
    # SQLite's rowid only ever breaks ties of equal timestamps in an ORDER BY;
    # the physical position is PostgreSQL's nearest (insertion order until updated).
    out = re.sub(r"\browid\b", "ctid", out, flags=re.IGNORECASE)
    if _INSERT_OR_IGNORE.match(out):
        out = _INSERT_OR_IGNORE.sub("INSERT ", out, count=1)
        m = _RETURNING.search(out)
        if m:
            out = out[: m.start()] + "ON CONFLICT DO NOTHING " + out[m.start() :]
        else:
            out = out.rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    if _DDL.match(out):
        out = re.sub(
            r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b",
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            out,
            flags=re.IGNORECASE,
        )
        out = re.sub(r"\bINTEGER\b", "BIGINT", out, flags=re.IGNORECASE)
        out = re.sub(r"\bREAL\b", "DOUBLE PRECISION", out, flags=re.IGNORECASE)
        out = re.sub(r"\bBLOB\b", "BYTEA", out, flags=re.IGNORECASE)
    return out
