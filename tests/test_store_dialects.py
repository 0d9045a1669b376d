"""The store on PostgreSQL next to SQLite: `db migrate`, `db copy`, cross-process
cache invalidation, and group commit on both (a real throwaway cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pg_cluster
import pytest
import sqlite_utils
from store_support import held

from provisiond import auth, devices, permissions, replay, tokens
from provisiond.errors import BadRequest, NotFound
from provisiond.schema import all_migrations
from provisiond.store import Store, migrate, open_database, transaction
from support import Broker, RpcClient, make_config, remember_secret, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> pg_cluster.PgCluster:
    return pg_cluster.shared()


def cli(*argv: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"}
    args = [sys.executable, "-m", "provisiond", *argv]
    if config is not None:
        args += ["-c", str(config)]
    return subprocess.run(args, capture_output=True, text=True, env=env, check=False, timeout=60)


def fill_sqlite(path: Path, n: int = 120) -> None:
    db = open_database(path)
    migrate(db, all_migrations())
    auth.create_org(db, 1, "gateway org")
    auth.create_user(db, 1, 10)
    auth.create_key(db, org_id=1, scopes=frozenset(auth.SCOPES))
    with transaction(db):
        for i in range(n):
            device_id = devices.create_device(db, org_id=1, owner_id=10, now=1000.0 + i)
            tokens.issue(db, device_id, now=1000.0 + i, lifetime=3600)
            replay.record(
                db, f"{i:064x}", bytes([i % 256]) * 40, time.time(), duplicate=AssertionError
            )
    db.conn.close()


def test_db_migrate_on_postgresql(tmp_path: Path, cluster: pg_cluster.PgCluster) -> None:
    config = tmp_path / "p.toml"
    config.write_text(f'[store]\nurl = "{cluster.new_database()}"\n')
    first = cli("db", "migrate", config=config)
    assert first.returncode == 0, first.stderr
    assert "applied: core-1-auth" in first.stdout
    again = cli("db", "migrate", config=config)
    assert (again.returncode, again.stdout.strip()) == (0, "schema is up to date")
    backup = cli("db", "backup", str(tmp_path / "b.db"), config=config)
    assert backup.returncode == 1 and "pg_dump" in backup.stderr


async def test_db_copy_moves_a_gateway_to_postgresql_and_the_daemon_runs_on_it(
    tmp_path: Path, cluster: pg_cluster.PgCluster, broker: Broker
) -> None:
    source = tmp_path / "gateway.db"
    fill_sqlite(source)
    config = make_config(tmp_path, broker, store={"url": cluster.new_database()})
    _, key = seed_key(make_config(tmp_path, broker, store={"path": str(source), "url": ""}))
    copied = cli("db", "copy", f"sqlite:///{source}", config.store.url)
    assert copied.returncode == 0, copied.stderr
    assert "devices 120" in copied.stdout and "replays 120" in copied.stdout
    # Into a store that holds rows: refused, nothing written twice.
    refused = cli("db", "copy", f"sqlite:///{source}", config.store.url)
    assert refused.returncode == 1 and "already holds rows" in refused.stderr

    async with running(config), RpcClient(config) as rpc:
        assert (await rpc.call("keys/whoami", {}, key=key))["status"] == 200
        reply = await rpc.call("provision/token", {"orgId": 1, "ownerId": 10}, key=key)
        # Generated ids continue after the copied ones.
        assert reply["status"] == 200 and reply["body"]["deviceId"] == 121


async def test_a_commit_by_another_process_clears_the_caches_within_the_poll(
    tmp_path: Path, cluster: pg_cluster.PgCluster, broker: Broker
) -> None:
    """LISTEN/NOTIFY stands in for SQLite's data_version: a revocation by the CLI bites in ≤0.2 s."""
    config = make_config(tmp_path, broker, store={"url": cluster.new_database()})
    key_id, key = seed_key(config)
    async with running(config), RpcClient(config) as rpc:
        assert (await rpc.call("keys/whoami", {}, key=key))["status"] == 200  # cached now
        db = open_database(config.store.url)
        auth.revoke_key(db, key_id)
        db.conn.close()
        revoked = time.monotonic()
        while (await rpc.call("keys/whoami", {}, key=key))["status"] == 200:
            pass
        # One poll (0.2 s) plus a request round trip on a busy machine.
        assert time.monotonic() - revoked < 0.5


# --- group commit on both stores


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return pg_cluster.shared().new_database()
    return str(tmp_path / "s.db")


MIGRATIONS = [
    *all_migrations(),
]


@contextlib.asynccontextmanager
async def open_store(target: str) -> AsyncIterator[Store]:
    store = Store(target)
    await store.open(MIGRATIONS)
    await store.call(lambda db: (auth.create_org(db, 1, "o"), auth.create_user(db, 1, 10)))
    try:
        yield store
    finally:
        await store.close()


def provision(fail: bool = False) -> Callable[[sqlite_utils.Database], int]:
    def fn(db: sqlite_utils.Database) -> int:
        device_id = devices.create_device(db, org_id=1, owner_id=10, now=1.0)
        tokens.issue(db, device_id, now=1.0, lifetime=60)
        if fail:
            raise NotFound("refused after writing")
        return device_id

    return fn


def broken_sql(db: sqlite_utils.Database) -> int:
    devices.create_device(db, org_id=1, owner_id=10, now=1.0)
    db.execute("INSERT INTO no_such_table VALUES (1)")
    return 0


async def test_group_commit_isolates_failures_on_both_stores(store_target: str) -> None:
    """On PostgreSQL a failed statement aborts the whole transaction; the savepoint rescues the rest."""
    async with open_store(store_target) as store:
        async with held(store):
            tasks = [
                asyncio.ensure_future(store.write(provision(fail=i == 2)))
                if i != 5
                else asyncio.ensure_future(store.write(broken_sql))
                for i in range(12)
            ]
            await asyncio.sleep(0.05)
        results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
        assert store.stats.commits == 1 and store.stats.largest_batch == 10
        assert isinstance(results[2], NotFound)
        assert isinstance(results[5], Exception) and not isinstance(results[5], NotFound)
        good = [r for i, r in enumerate(results) if i not in (2, 5)]
        rows = await store.call(
            lambda db: [r[0] for r in db.execute("SELECT id FROM devices ORDER BY id").fetchall()]
        )
        tokens_of = await store.call(
            lambda db: {r[0] for r in db.execute("SELECT device_id FROM provision_tokens")}
        )
    assert rows == sorted(good) and tokens_of == set(good)


class _Duplicate(Exception):
    pass


def pipelined_provision(
    n: int, *, owner: int = 10, rid: str | None = None
) -> Callable[[sqlite_utils.Database], int]:
    """provision/token's write as `ops.provision` and `Request.write` make it."""

    def fn(db: sqlite_utils.Database) -> int:
        device_id = devices.create_device(
            db,
            org_id=1,
            owner_id=owner,
            now=1.0,
            owner_check=lambda: permissions.unknown_owner(org_id=1, owner_id=owner),
        )
        tokens.issue(db, device_id, now=1.0, lifetime=60, new_device=True)
        sealed = f"reply {n} {device_id}".encode()
        replay.record(db, rid or f"{n:064x}", sealed, 1.0, duplicate=_Duplicate)
        return device_id

    return fn


def pipelined_broken(db: sqlite_utils.Database) -> int:
    devices.create_device(db, org_id=1, owner_id=10, now=1.0)
    db.execute("INSERT INTO no_such_table VALUES (?)", [1])
    return 0


@pytest.mark.parametrize("id_block", [devices.ID_BLOCK, 3])
async def test_pipelined_writes_keep_each_failure_its_own(
    store_target: str, id_block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL sends a run of pipelined writes whole, one statement each: an
    unknown owner, a duplicate replay record and a broken statement in the run
    still fail only their own write (the run goes again, write by write), and
    the others commit with their device, token and replay record. With small
    blocks of device ids, blocks are also drawn behind the failing statement."""
    monkeypatch.setattr(devices, "ID_BLOCK", id_block)
    same = f"{999:064x}"
    async with open_store(store_target) as store:
        async with held(store):
            tasks = []
            for i in range(12):
                if i == 3:
                    fn = pipelined_provision(i, owner=99)
                elif i == 5:
                    fn = pipelined_broken
                elif i in (7, 9):
                    fn = pipelined_provision(i, rid=same)
                else:
                    fn = pipelined_provision(i)
                tasks.append(asyncio.ensure_future(store.write(fn, pipelined=True)))
            await asyncio.sleep(0.05)
        results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
        assert store.stats.commits == 1 and store.stats.largest_batch == 9, (store.stats, results)
        if store_target.startswith("postgresql"):
            assert store.stats.pipelined_retries == 1
        # Alone, a pipelined write succeeds in the run on the next batch.
        good_batch = [
            asyncio.ensure_future(store.write(pipelined_provision(100 + i), pipelined=True))
            for i in range(3)
        ]
        more = await asyncio.gather(*good_batch)

        def read(db: sqlite_utils.Database) -> tuple[list[int], set[int], int]:
            ids = [r[0] for r in db.execute("SELECT id FROM devices ORDER BY id").fetchall()]
            owned = {r[0] for r in db.execute("SELECT device_id FROM provision_tokens")}
            replays = int(db.execute("SELECT COUNT(*) FROM replays").fetchone()[0])
            return ids, owned, replays

        ids, owned, replays = await store.call(read)
    assert isinstance(results[3], BadRequest) and results[3].code == "unknown_user"
    assert isinstance(results[5], Exception) and not isinstance(results[5], BadRequest)
    assert isinstance(results[9], _Duplicate)
    good = [r for i, r in enumerate(results) if i not in (3, 5, 9)] + more
    assert len(set(good)) == len(good)
    assert ids == sorted(good) and owned == set(good)
    assert replays == len(good)


async def test_writes_from_two_stores_on_one_database_serialise(store_target: str) -> None:
    """Two processes' write transactions never interleave (SQLite's lock; PostgreSQL's advisory lock)."""
    async with open_store(store_target) as a, open_store_again(store_target) as b:

        def bump(db: sqlite_utils.Database) -> None:
            # A read-modify-write that loses updates unless writers serialise.
            n = int(db.execute("SELECT COUNT(*) FROM users").fetchone()[0])
            db.execute("INSERT INTO users (id, org_id, created_at) VALUES (?, 1, 0)", [1000 + n])

        await asyncio.gather(*(s.write(bump) for _ in range(40) for s in (a, b)))
        count = await a.call(lambda db: db.execute("SELECT COUNT(*) FROM users").fetchone()[0])
    assert count == 81


@contextlib.asynccontextmanager
async def open_store_again(target: str) -> AsyncIterator[Store]:
    store = Store(target)
    await store.open(MIGRATIONS)
    try:
        yield store
    finally:
        await store.close()


async def test_the_password_comes_from_its_file_and_stays_out_of_logs(
    tmp_path: Path, cluster: pg_cluster.PgCluster, broker: Broker
) -> None:
    password = remember_secret("pg-" + uuid.uuid4().hex)
    with contextlib.suppress(Exception):
        cluster.sql("CREATE ROLE secured LOGIN")
    cluster.sql(f"ALTER ROLE secured PASSWORD '{password}'")
    url = cluster.new_database(owner="secured")
    secret = tmp_path / "pg-password"
    secret.write_text(password + "\n")
    config = make_config(tmp_path, broker, store={"url": url, "password_file": str(secret)})
    key_id, key = seed_key(config)
    async with running(config), RpcClient(config) as rpc:
        assert (await rpc.call("keys/whoami", {}, key=key))["body"]["key_id"] == key_id

    secret.write_text("wrong\n")
    wrong = make_config(tmp_path, broker, store={"url": url, "password_file": str(secret)})
    with pytest.raises(Exception) as err:
        async with running(wrong):
            pass
    assert password not in repr(err.value) and "wrong" not in str(err.value)


async def test_two_processes_migrating_one_new_database_at_once(store_target: str) -> None:
    """Two daemons starting together on an empty store: each migration runs once."""

    def open_and_migrate() -> list[str]:
        db = open_database(store_target)
        try:
            return migrate(db, all_migrations())
        finally:
            db.conn.close()

    first, second = await asyncio.gather(
        asyncio.to_thread(open_and_migrate), asyncio.to_thread(open_and_migrate)
    )
    names = [m.name for m in all_migrations()]
    assert sorted(first + second) == sorted(names)


async def test_postgresql_restart_gives_503_then_recovers(tmp_path: Path, broker: Broker) -> None:
    """The server goes away under a running daemon: 503s, never a crash, then service again."""
    private = pg_cluster.PgCluster().start()
    try:
        config = make_config(tmp_path, broker, store={"url": private.new_database()})
        _, key = seed_key(config, users=(1,))
        body = {"orgId": 1, "ownerId": 1}
        async with running(config), RpcClient(config) as rpc:
            assert (await rpc.call("provision/token", body, key=key))["status"] == 200
            private.halt()
            down = await rpc.call("provision/token", body, key=key)
            assert down["status"] == 503 and down["error"]["code"] == "store_unavailable", down
            assert (await rpc.call("keys/whoami", {}, key=key))["status"] == 200  # cached key
            private.resume()
            statuses = []
            deadline = time.monotonic() + 10
            while not statuses or statuses[-1] != 200:
                assert time.monotonic() < deadline, statuses
                statuses.append((await rpc.call("provision/token", body, key=key))["status"])
        assert set(statuses) <= {200, 503}, statuses
    finally:
        private.stop()
