"""Several daemons, one fleet: who is the leader (docs/scaling.md, "Several daemons").

With `[mqtt] shared_group` set, the daemons of a group share the RPC
requests and the device topics (each message reaches one of them), and the
device-side decisions that must be made once — a presence transition, the
delivery of a queued command — are made by one daemon: the leader. Every
daemon campaigns; the one holding the leader lock leads until its process
dies (or, on PostgreSQL, its lock connection breaks), and then another takes
the lock within `CAMPAIGN_SECONDS`.

The lock belongs to the store the daemons share, so no other service is
needed:

- PostgreSQL: a session-level advisory lock on a connection of its own. The
  server releases it the moment that connection ends, which a `kill -9` of
  the process does at once (a lost host: when TCP keepalive gives up, set
  in the connection below).
- SQLite (several processes on one gateway): `flock` on a file beside the
  database, released by the kernel when the process dies.

Without `shared_group` the one daemon is the leader from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from provisiond.logs import get_logger
from provisiond.runtime.app import App
from provisiond.runtime.services import ServiceKey
from provisiond.store import is_postgresql, store_target

if TYPE_CHECKING:
    from provisiond.rpc import Router

log = get_logger("provisiond.cluster")

# How often a follower tries the lock, and a leader checks it still holds it.
CAMPAIGN_SECONDS = 0.2
# Distinct from the store's write lock (pg.WRITE_LOCK_KEY): "provisiond leader".
LEADER_LOCK_KEY = 0x70_72_6F_76_6C_65_61_64
# A lost host (not a lost process) is noticed when TCP keepalive gives up: ~10 s.
_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


class LeaderLock(Protocol):
    def try_acquire(self) -> bool: ...
    def still_held(self) -> bool: ...
    def release(self) -> None: ...


class FileLock:
    """`flock` on a file beside the SQLite database."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock on a connection of its own."""

    def __init__(self, url: str, password: str | None) -> None:
        self._url = url
        self._password = password
        self._conn: Any = None

    def try_acquire(self) -> bool:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 5, **_KEEPALIVE}
            if self._password is not None:
                kwargs["password"] = self._password
            self._conn = psycopg.connect(self._url, **kwargs)
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_LOCK_KEY]).fetchone()
        return bool(row and row[0])

    def still_held(self) -> bool:
        import psycopg

        try:
            self._conn.execute("SELECT 1")
        except (psycopg.Error, AttributeError):
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # ending the session releases the lock
            self._conn = None


class Cluster:
    """Whether this daemon shares its group's work, and whether it leads now."""

    def __init__(self, app: App) -> None:
        self._app = app
        self.group = app.config.mqtt.shared_group
        self.leader = asyncio.Event()
        self.elections = 0  # times this daemon became the leader
        self._lock: LeaderLock | None = None

    @property
    def shared(self) -> bool:
        """Device topics and device-side decisions are shared with other daemons."""
        return bool(self.group)

    @property
    def is_leader(self) -> bool:
        return self.leader.is_set()

    async def start(self) -> None:
        if not self.shared:
            self.leader.set()
            return
        self._lock = _lock_for(self._app)
        self._app.spawn(self._campaign(), name="cluster-campaign")

    async def stop(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            self.leader.clear()
            await asyncio.to_thread(lock.release)

    async def _campaign(self) -> None:
        while self._lock is not None:
            lock = self._lock
            try:
                if self.is_leader:
                    if not await asyncio.to_thread(lock.still_held):
                        self.leader.clear()
                        log.warning("cluster.leadership_lost", group=self.group)
                elif await asyncio.to_thread(lock.try_acquire):
                    self.elections += 1
                    self.leader.set()
                    log.info("cluster.elected", group=self.group, pid=os.getpid())
            except Exception as exc:  # the store may be down; keep campaigning
                self.leader.clear()
                await asyncio.to_thread(lock.release)
                log.warning("cluster.campaign_failed", error=str(exc))
                await asyncio.sleep(1.0)
            await asyncio.sleep(CAMPAIGN_SECONDS)

    async def stats(self) -> dict[str, Any]:
        return {"group": self.group or None, "leader": self.is_leader, "elections": self.elections}


def _lock_for(app: App) -> LeaderLock:
    target, password = store_target(app.config)
    if is_postgresql(target):
        return AdvisoryLock(str(target), password)
    path = Path(target)
    return FileLock(path.with_name(path.name + ".leader"))


CLUSTER: ServiceKey[Cluster] = ServiceKey("cluster")


def setup(app: App, _router: Router) -> None:
    """Campaign for leadership among the daemons of `[mqtt] shared_group`; provides CLUSTER."""
    cluster = Cluster(app)
    app.services.provide(CLUSTER, cluster)
    app.stats_probes["cluster"] = cluster.stats
    app.on_start.append(cluster.start)
    app.on_stop.append(cluster.stop)
