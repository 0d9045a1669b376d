"""Group commit: concurrent writes share one COMMIT without sharing each other's failures.

Store-level tests hold the store thread busy so that a known set of writes
queues up and is committed as one batch; daemon-level tests drive real
concurrent requests through mosquitto, and one kills the daemon with
`kill -9` under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlite_utils
from store_support import held
from test_faults import (
    PatientRequester,
    _daemon,
    _wait_serving,
    _write_config,
    assert_each_answered_once_without_duplicates,
)

import support
from provisiond import replay
from provisiond.errors import NotFound, StoreUnavailable
from provisiond.store import Migration, Store, open_database
from support import Broker, RpcClient, make_config, open_db, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

MIGRATIONS = [
    Migration(
        "test-1",
        """
        CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE);
        CREATE TABLE parents (id INTEGER PRIMARY KEY);
        CREATE TABLE children (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            parent INTEGER NOT NULL REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED
        );
        """,
    ),
    *replay.MIGRATIONS,
]
# A constraint the database itself enforces, as each store reports it.
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError)


@pytest.fixture
def target(tmp_path: Path) -> str:
    """A new store of the store under test: a SQLite file, or a PostgreSQL database."""
    import pg_cluster

    if pg_cluster.store_under_test() == "postgresql":
        return pg_cluster.shared().new_database()
    return str(tmp_path / "s.db")


@contextlib.asynccontextmanager
async def open_store(target: str, **kwargs: Any) -> AsyncIterator[Store]:
    store = Store(target, **kwargs)
    await store.open(MIGRATIONS)
    try:
        yield store
    finally:
        await store.close()


def insert(name: str) -> Callable[[sqlite_utils.Database], str]:
    def fn(db: sqlite_utils.Database) -> str:
        db.execute("INSERT INTO items (name) VALUES (?)", [name])
        return name

    return fn


def names(target: str) -> set[str]:
    """The items another connection reads."""
    return {row[0] for row in read(target, "SELECT name FROM items")}


def read(target: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = open_database(target)
    try:
        return [tuple(row) for row in db.execute(sql, list(params)).fetchall()]
    finally:
        db.conn.close()


async def test_a_failing_write_is_rolled_back_alone_and_the_batch_commits(target: str) -> None:

    def insert_then_fail(db: sqlite_utils.Database) -> str:
        db.execute("INSERT INTO items (name) VALUES ('half-done')")
        raise NotFound("no such thing")

    async with open_store(target) as store:
        async with held(store):
            tasks = [asyncio.ensure_future(store.write(insert(f"ok-{i}"))) for i in range(10)]
            tasks.insert(3, asyncio.ensure_future(store.write(insert_then_fail)))
            # A constraint violation inside the database itself, after the others' inserts.
            tasks.insert(7, asyncio.ensure_future(store.write(insert("ok-0"))))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert store.stats.largest_batch == 10, store.stats  # one batch, two failed
        assert store.stats.commits == 1
    assert isinstance(results[3], NotFound)
    assert isinstance(results[7], INTEGRITY_ERRORS)
    good = [r for i, r in enumerate(results) if i not in (3, 7)]
    assert good == [f"ok-{i}" for i in range(10)]
    assert names(target) == {f"ok-{i}" for i in range(10)}


async def test_a_failed_commit_fails_every_write_of_the_batch(target: str) -> None:

    def orphan(db: sqlite_utils.Database) -> None:
        # The deferred foreign key is only checked at COMMIT, so COMMIT fails.
        db.execute("INSERT INTO children (parent) VALUES (42)")

    async with open_store(target) as store:
        async with held(store):
            tasks = [asyncio.ensure_future(store.write(insert(f"a-{i}"))) for i in range(5)]
            tasks.append(asyncio.ensure_future(store.write(orphan)))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, INTEGRITY_ERRORS) for r in results), results
        assert names(target) == set()
        # The connection is usable again: the next batch commits.
        assert await store.write(insert("after")) == "after"
    assert names(target) == {"after"}


async def test_every_write_is_committed_when_its_caller_resumes(target: str) -> None:
    """Persist before reply: a caller that resumes finds its row in another connection."""
    async with open_store(target) as store:
        other = open_database(target)

        async def one(name: str) -> None:
            await store.write(insert(name))
            # What a reply would promise: the row is durable and visible to others.
            assert other.execute("SELECT 1 FROM items WHERE name = ?", [name]).fetchone()

        try:
            await asyncio.gather(*(one(f"n-{i}") for i in range(400)))
        finally:
            other.conn.close()
        assert store.stats.writes == 400
        assert store.stats.commits < 400, "nothing was batched; the test proved nothing"
    assert len(names(target)) == 400


async def test_duplicates_in_one_batch_record_one_reply(target: str) -> None:
    """As `Request.write`: the effect and its reply record commit together, once."""
    rid = hashlib.sha256(b"same request").hexdigest()

    class Duplicate(Exception):
        pass

    def effect(n: int) -> Callable[[sqlite_utils.Database], int]:
        def fn(db: sqlite_utils.Database) -> int:
            db.execute("INSERT INTO items (name) VALUES (?)", [f"copy-{n}"])
            replay.record(db, rid, f"reply {n}".encode(), 1000.0, duplicate=Duplicate)
            return n

        return fn

    async with open_store(target) as store:
        async with held(store):
            tasks = [asyncio.ensure_future(store.write(effect(n))) for n in range(5)]
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 0
    assert all(isinstance(r, Duplicate) for r in results[1:])
    assert names(target) == {"copy-0"}
    assert [bytes(r[0]) for r in read(target, "SELECT reply FROM replays")] == [b"reply 0"]


async def test_a_cancelled_write_that_has_not_run_never_runs(target: str) -> None:
    async with open_store(target) as store:
        async with held(store):
            keep = asyncio.ensure_future(store.write(insert("kept")))
            drop = asyncio.ensure_future(store.write(insert("dropped")))
            await asyncio.sleep(0.05)
            drop.cancel()
        assert await keep == "kept"
        with pytest.raises(asyncio.CancelledError):
            await drop
    assert names(target) == {"kept"}


async def test_without_group_commit_each_write_commits_alone(target: str) -> None:
    async with open_store(target, group_commit=False) as store:
        await asyncio.gather(*(store.write(insert(f"x-{i}")) for i in range(50)))
        assert (store.stats.commits, store.stats.largest_batch) == (50, 1)
    assert len(names(target)) == 50


async def test_a_closed_store_fails_writes_as_unavailable(target: str) -> None:
    async with open_store(target) as store:
        pass
    with pytest.raises(StoreUnavailable):
        await store.write(insert("late"))


# --- the daemon


async def test_concurrent_requests_share_commits_and_a_refused_one_harms_none(
    tmp_path: Path, broker: Broker
) -> None:
    config = make_config(tmp_path, broker)
    _, key = seed_key(config, users=(1,))
    async with running(config) as server, RpcClient(config) as rpc:
        futures = [
            # ownerId 99 is no user of the org: refused inside its transaction.
            await rpc.send(
                "provision/token", {"orgId": 1, "ownerId": 99 if i % 5 == 0 else 1}, key=key
            )
            for i in range(300)
        ]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert server.app is not None
        stats = server.app.store.stats
    ok = [r["body"] for i, r in enumerate(replies) if i % 5]
    assert all(r["status"] == 200 for i, r in enumerate(replies) if i % 5), replies
    assert all(r["status"] in (400, 403, 404) for i, r in enumerate(replies) if i % 5 == 0)
    assert stats.commits < stats.writes, f"no batch formed: {stats}"
    db = open_db(config)
    rows = {r[0] for r in db.execute("SELECT id FROM devices")}
    hashes = {r[0] for r in db.execute("SELECT hash FROM provision_tokens")}
    db.conn.close()
    assert rows == {b["deviceId"] for b in ok}
    assert hashes == {hashlib.sha256(b["token"].encode()).hexdigest() for b in ok}


async def test_kill9_under_batched_load_every_reply_is_durable(
    tmp_path: Path, broker: Broker, heavy: bool
) -> None:
    n = 5_000 if heavy else 800
    config = make_config(tmp_path, broker)
    config_path = tmp_path / "provisiond.toml"
    _write_config(config, config_path)
    log = tmp_path / "daemon.log"
    _, key = seed_key(config, users=(1,))
    proc = _daemon(config_path, log)
    try:
        await _wait_serving(config, key)
        requester = PatientRequester(config, key, [{"orgId": 1, "ownerId": 1}] * n)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(requester.run(deadline=loop.time() + (600 if heavy else 120)))
        async with RpcClient(config) as rpc:
            while requester.answered < n // 4:
                assert not task.done() and proc.poll() is None
                await asyncio.sleep(0.005)
            stats = (await rpc.call("daemon/stats", {}, key=key))["body"]["store"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert stats["group_commit"] and stats["commits"] < stats["writes"], stats
        assert requester.unanswered(), "everything was answered before the kill"
        # Every reply received before the kill is durable right now, before any restart.
        received = {uuid.UUID(bytes=c): r[0]["body"] for c, r in requester.replies.items()}
        db = open_db(config)
        devices = {r[0] for r in db.execute("SELECT id FROM devices")}
        hashes = {r[0] for r in db.execute("SELECT hash FROM provision_tokens")}
        db.conn.close()
        for body in received.values():
            assert body["deviceId"] in devices
            assert hashlib.sha256(body["token"].encode()).hexdigest() in hashes
        proc = _daemon(config_path, log)
        await task
        await _wait_serving(config, key)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    support.LOG_EVENTS.extend(log.read_text().splitlines())
    # Redeliveries after the restart were answered from the replay record: once each.
    assert_each_answered_once_without_duplicates(requester, config)
