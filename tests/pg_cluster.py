"""A throwaway PostgreSQL cluster from Debian's `postgresql` package.

`initdb` refuses to run as root (and CI runs as root), so the cluster runs as
the package's `postgres` user (`runuser -u postgres --`), in a temp dir, on a
free loopback port. One cluster serves a whole test session; each test gets
its own database.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found: apt-get install -y postgresql (scripts/setup.sh)")
    return found[-1]


class PgCluster:
    def __init__(self, *, fsync: bool = False) -> None:
        self.port = free_port()
        self.fsync = fsync
        self.dir = Path(tempfile.mkdtemp(prefix="pvd-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.started = False

    def _as_postgres(self, *argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        runas = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        return subprocess.run(
            [*runas, *argv],
            check=True,
            capture_output=True,
            text=True,
            **kwargs,  # type: ignore[call-overload]
        )

    def start(self) -> PgCluster:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(
            _bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        # Trust for the suite's own user; a password (SCRAM) for `secured`,
        # whose tests prove the password file is read and used.
        hba = self.data / "pg_hba.conf"
        self._as_postgres(
            "sh", "-c",
            f"printf 'host all secured 127.0.0.1/32 scram-sha-256\\n' | cat - {hba} > {hba}.new"
            f" && mv {hba}.new {hba}",
        )  # fmt: skip
        options = self._options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
            f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        )
        self._as_postgres(
            _bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )
        self.started = True
        return self

    def halt(self) -> None:
        """Stop the server at once: every connection is cut."""
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        self._as_postgres(
            _bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", self._options, "-w", "start"
        )  # fmt: skip

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def new_database(self, owner: str = "postgres") -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name} OWNER {owner}")
        return self.url(name, user=owner)

    def stop(self) -> None:
        if self.started:
            self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


_SHARED: dict[str, PgCluster] = {}


def shared() -> PgCluster:
    """The session's cluster, started on first use and stopped at exit."""
    if "cluster" not in _SHARED:
        cluster = _SHARED["cluster"] = PgCluster().start()
        atexit.register(cluster.stop)
    return _SHARED["cluster"]


# Not PROVISIOND_*: the daemon reads those as config overrides.
ENV = "TEST_STORE"


def store_under_test() -> str:
    """Which store the suite runs on: `pytest --store postgresql` (or TEST_STORE=postgresql)."""
    return os.environ.get(ENV, "sqlite")
