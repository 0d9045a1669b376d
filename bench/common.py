"""Shared bench parts: a private mosquitto, the daemon as a real process, an
echo responder baseline, and a load driver that keeps N requests in flight.

Everything runs on loopback, bounded in count and time, and cleans up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}:{ROOT}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextlib.contextmanager
def mosquitto(directory: Path, extra: str = "") -> Iterator[int]:
    """A private broker. QoS 0 floods need max_queued_messages raised, or
    mosquitto drops messages past its queue limit and the numbers lie."""
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        "max_queued_messages 1000000\nmax_inflight_messages 0\nmax_queued_bytes 0\n"
        f"persistence false\n{extra}\n"
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)],
        stdout=(directory / "mosquitto.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="provisiond-bench-") as d:
        yield Path(d)


def write_config(
    directory: Path,
    port: int,
    *,
    prefix: str = "bench",
    client_id: str = "provisiond-bench",
    extra: str = "",
    log_level: str = "warning",
    client: str = "native",
    filename: str = "provisiond.toml",
) -> Path:
    # log_level="info" keeps the one-line-per-request log a production daemon writes.
    # client: the daemon's MQTT backend ([mqtt] client).
    path = directory / filename
    # On PostgreSQL the store keeps the signing keys, sealed under a
    # key-encryption key every daemon of the bench shares.
    kek = f'key_encryption_key_file = "{kek_file()}"\n' if 'url = "postgres' in extra else ""
    path.write_text(
        f'[log]\nlevel = "{log_level}"\nformat = "json"\n'
        f'[mqtt]\nclient = "{client}"\nhost = "127.0.0.1"\nport = {port}\n'
        f'topic_prefix = "{prefix}"\nclient_id = "{client_id}"\n'
        f'[store]\npath = "{directory / "provisiond.db"}"\n{kek}{extra}'
    )
    return path


_KEK: list[Path] = []


def kek_file() -> Path:
    """This bench process's key-encryption key file (made on first use, removed at exit)."""
    if not _KEK:
        import atexit
        import base64

        d = Path(tempfile.mkdtemp(prefix="provisiond-bench-kek-"))
        path = d / "kek"
        path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        path.chmod(0o600)
        atexit.register(shutil.rmtree, d, True)
        _KEK.append(path)
    return _KEK[0]


def seed(directory: Path, *, users: int = 1) -> str:
    """Organisation 1, users 1..N, and an all-scopes org key; returns the key."""
    sys.path.insert(0, str(ROOT / "daemon"))
    from provisiond import auth
    from provisiond.schema import all_migrations
    from provisiond.store import connect, migrate

    db = connect(directory / "provisiond.db")
    migrate(db, all_migrations())
    auth.create_org(db, 1, "bench")
    for uid in range(1, users + 1):
        auth.create_user(db, 1, uid)
    _, key = auth.create_key(db, org_id=1, scopes=frozenset(auth.SCOPES))
    db.conn.close()
    return key


def seed_url(url: str) -> str:
    """`seed` for a store named by URL (a SQLite file or PostgreSQL): the org key."""
    from provisiond import auth
    from provisiond.schema import all_migrations
    from provisiond.store import migrate, open_database

    db = open_database(url)
    migrate(db, all_migrations())
    auth.create_org(db, 1, "bench")
    auth.create_user(db, 1, 1)
    _, key = auth.create_key(db, org_id=1, scopes=frozenset(auth.SCOPES))
    db.conn.close()
    return key


@contextlib.contextmanager
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster (tests/pg_cluster.py) with fsync on and
    `synchronous_commit = on` (the defaults), or None without the package."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        yield None
        return
    from tests.pg_cluster import PgCluster

    cluster = PgCluster(fsync=True).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def pg_cpu_seconds(cluster: Any) -> float:
    """User + system CPU of a PostgreSQL cluster's processes alive now (the
    postmaster and its children: backends, WAL writer, checkpointer), Linux."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster or stat.parent.name == str(postmaster):
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.contextmanager
def seeded_broker(users: int = 1) -> Iterator[tuple[Path, int, str]]:
    """A work directory, a private broker and a seeded store: (directory, port, org key)."""
    with workdir() as directory, mosquitto(directory) as port:
        yield directory, port, seed(directory, users=users)


@contextlib.contextmanager
def daemon_process(
    config: Path, log: Path, *, code: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`provisiond run` on `config`; from another checkout's tree with `code`."""
    env = ENV
    if code is not None:
        env = {**os.environ, "PYTHONPATH": f"{code / 'daemon'}:{code / 'plugins'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisiond", "run", "-c", str(config)],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=code,
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def responder(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` running for the block, its output dropped (a responder's is noise)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, **popen)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def echo_process(
    port: int, topic: str, client: str = "aiomqtt"
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return responder(
        [sys.executable, "-m", "bench.echo", "--port", str(port), "--topic", topic,
         "--client", client],
        env=ENV,
    )  # fmt: skip


@dataclass
class LoadResult:
    n: int
    seconds: float
    latencies_ms: list[float]
    statuses: dict[int, int]

    @property
    def throughput(self) -> float:
        return self.n / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.n,
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.pct(0.50), 2),
            "p99_ms": round(self.pct(0.99), 2),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 2),
            "statuses": self.statuses,
        }


class LoadOptions(TypedDict, total=False):
    """How a closed-loop load runs, whichever driver runs it (this one, or the C
    one in bench.cmqtt); see `load_shape` for the defaults."""

    key: Required[str | None]
    n: Required[int]
    concurrency: int
    warmup: int
    timeout: float


def load_shape(options: LoadOptions) -> tuple[int, int, float]:
    """(concurrency, warmup, timeout): the load's own, or the defaults."""
    return options.get("concurrency", 32), options.get("warmup", 200), options.get("timeout", 120)


async def rpc_load(
    port: int, topic: str, body: dict[str, Any] | bytes, **options: Unpack[LoadOptions]
) -> LoadResult:
    """Closed loop: `concurrency` workers each send a request and wait for its
    reply before sending the next; n measured requests after a warm-up."""
    key, n = options["key"], options["n"]
    concurrency, warmup, timeout = load_shape(options)
    reply_topic = f"bench-replies/{uuid.uuid4().hex}"
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    pending: dict[bytes, asyncio.Future[int]] = {}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(1 << 62))
    # Unique per run: the daemon answers a repeated (key, operation, correlation)
    # from its replay store, so reused correlations would measure that cache.
    run_id = uuid.uuid4().bytes[:8]

    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=65535,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:  # fmt: skip
        client.pending_calls_threshold = 1 << 30  # many in flight is the point here
        await client.subscribe(reply_topic, qos=1)

        async def reader() -> None:
            async for message in client.messages:
                corr = bytes(message.properties.CorrelationData)  # type: ignore[union-attr]
                fut = pending.pop(corr, None)
                if fut is not None and not fut.done():
                    fut.set_result(json.loads(message.payload).get("status", 0))  # type: ignore[arg-type]

        async def one(measure: bool) -> None:
            corr = run_id + next(counter).to_bytes(8, "big")
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = corr
            if key is not None:
                props.UserProperty = ("authorization", f"Bearer {key}")
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            pending[corr] = fut
            started = time.perf_counter()
            await client.publish(topic, payload, qos=1, properties=props)
            status = await fut
            if measure:
                latencies.append((time.perf_counter() - started) * 1000)
                statuses[status] = statuses.get(status, 0) + 1

        async def worker(count: int, measure: bool) -> None:
            for _ in range(count):
                await one(measure)

        async def phase(total: int, measure: bool) -> None:
            per, extra = divmod(total, concurrency)
            await asyncio.gather(*(worker(per + (i < extra), measure) for i in range(concurrency)))

        task = asyncio.create_task(reader())
        try:
            if warmup:
                await asyncio.wait_for(phase(warmup, False), timeout)
            start = time.perf_counter()
            await asyncio.wait_for(phase(n, True), timeout)
            elapsed = time.perf_counter() - start
        finally:
            task.cancel()
    return LoadResult(n, elapsed, latencies, statuses)


async def wait_rpc_ready(
    port: int, topic: str, key: str | None, timeout: float = 30, poll: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await rpc_load(port, topic, {}, key=key, n=1, warmup=0, concurrency=1, timeout=poll)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"no reply on {topic}")


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def versus_echo(result: LoadResult, echo: LoadResult) -> dict[str, Any]:
    """`result`'s summary, with its throughput and p99 as ratios to the echo baseline's."""
    return {
        **result.summary(),
        "throughput_vs_echo": ratio(result.throughput, echo.throughput),
        "p99_vs_echo": ratio(result.pct(0.99), echo.pct(0.99)),
    }


def arg_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The options of a bench run on its own: `--quick`, and `--n` requests."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int)
    return parser


def report(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps({"bench": name, **figures}, indent=2))
    return figures
