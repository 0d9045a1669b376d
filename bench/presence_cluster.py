"""Presence with several daemons (docs/scaling.md): one daemon alone vs a group of three.

    .venv/bin/python -m bench presence_cluster [--quick]

Each configuration gets a fresh broker and store with N active devices and
real daemon processes: one daemon without a group (today's single-gateway
mode, the baseline, on SQLite), then groups (`[mqtt] shared_group`) of one
and three daemons on SQLite and on PostgreSQL (a throwaway cluster from the
Debian package, fsync on). A publisher process sends one heartbeat per device
spread over S seconds with interval 30 s, so the whole fleet is online; then
the measured round: one more heartbeat each, interval 1 s (its deadline 3 s
later at the default timeout factor), spread over S seconds, and silence.
An observer process records when each device's offline presence arrives:

- lateness = arrival - (send + 3 s): measured from the send, it over-states
  lateness by the delivery delay, never under-states it;
- CPU = the daemons' user + system time over the measured round and the
  expiry that follows, per heartbeat (all daemons together): a steady
  heartbeat plus one offline transition each; what sharing the fleet costs
  against one daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ENV, mosquitto, report, workdir
from bench.grant import cpu_seconds
from bench.group_commit import _cluster
from bench.presence import PREFIX

INTERVAL = 1.0
FACTOR = 3.0  # the default timeout_factor


def seed(url: str, n: int) -> None:
    """Organisation 1, user 1 and devices 1..n, active, in the store at `url`."""
    from provisiond import auth
    from provisiond.schema import all_migrations
    from provisiond.store import migrate, open_database

    db = open_database(url)
    migrate(db, all_migrations())
    auth.create_org(db, 1, "bench")
    auth.create_user(db, 1, 1)
    now = time.time()
    db.conn.executemany(
        "INSERT INTO devices (id, org_id, owner_id, state, capabilities, public_key,"
        " created_at, activated_at) VALUES (?, 1, 1, 'active', 2, ?, ?, ?)",
        [(i, b"k" * 32, now, now) for i in range(1, n + 1)],
    )
    db.conn.close()


def write_config(directory: Path, port: int, name: str, url: str, group: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(
        f'[log]\nlevel = "info"\nformat = "json"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopic_prefix = "{PREFIX}"\n'
        f'client_id = "pvd-{name}"\nshared_group = "{group}"\n'
        f'[store]\npath = "{directory / (name + ".db")}"\nurl = "{url}"\n'
    )
    return path


@contextlib.contextmanager
def daemons(configs: list[Path], directory: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for config in configs:
            log = (directory / f"{config.stem}.log").open("ab")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "provisiond", "run", "-c", str(config)],
                    env=ENV,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


async def logged(directory: Path, names: list[str], event: str, timeout: float = 60) -> None:
    """Until each named daemon's log has `event`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            any(
                json.loads(line).get("event") == event
                for line in (directory / f"{name}.log").read_text().splitlines()
                if line.startswith("{")
            )
            for name in names
        ]
        if all(found):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{event} not logged by all of {names}")
        await asyncio.sleep(0.1)


async def _publish(port: int, n: int, interval: float, seconds: float, times: Path) -> None:
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.presence", "publish", "--port", str(port),
        "--first", "1", "--count", str(n), "--interval", str(interval),
        "--seconds", str(seconds), "--times", str(times), env=ENV,
    )  # fmt: skip
    assert await publisher.wait() == 0


async def one(
    n: int, seconds: float, store: str, url: str, count: int, group: str
) -> dict[str, Any]:
    with workdir() as directory, mosquitto(directory) as port:
        target = url or f"sqlite:///{directory / 'shared.db'}"
        seed(target, n)
        names = [f"node{i}" for i in range(count)]
        configs = [write_config(directory, port, name, target, group) for name in names]
        with daemons(configs, directory) as procs:
            await logged(directory, names, "daemon.ready")
            if group:
                await logged(directory, names, "presence.loaded")
            # Round 1: the whole fleet comes online (interval 30 s, so it stays).
            await _publish(port, n, 30.0, seconds, directory / "round1.bin")
            await asyncio.sleep(2.0)
            sent_file, arrived_file = directory / "sent.bin", directory / "arrived.bin"
            observer = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.presence", "observe", "--port", str(port),
                "--first", "1", "--count", str(n),
                "--timeout", str(seconds + INTERVAL * FACTOR + 60),
                "--out", str(arrived_file), env=ENV, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert observer.stdout is not None
            assert (await observer.stdout.readline()).strip() == b"ready"
            cpu_before = sum(cpu_seconds(p.pid) for p in procs)
            # Round 2, measured: one more heartbeat each (interval 1 s), then silence.
            await _publish(port, n, INTERVAL, seconds, sent_file)
            assert await observer.wait() == 0
            cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
        sent, arrived = array("d"), array("d")
        sent.frombytes(sent_file.read_bytes())
        arrived.frombytes(arrived_file.read_bytes())
    late = sorted(
        a - (s + INTERVAL * FACTOR) for s, a in zip(sent, arrived, strict=True) if not math.isnan(a)
    )

    def pct(q: float) -> float | None:
        return round(late[min(len(late) - 1, int(q * len(late)))], 3) if late else None

    return {
        "store": store,
        "daemons": count,
        "group": bool(group),
        "offline_seen": len(late),
        "offline_lateness_p50_s": pct(0.5),
        "offline_lateness_p99_s": pct(0.99),
        "offline_lateness_max_s": pct(1.0),
        "daemon_cpu_us_per_heartbeat": round(cpu / n * 1e6, 1),
    }


async def run(quick: bool) -> dict[str, Any]:
    n, seconds = (5_000, 5.0) if quick else (20_000, 10.0)
    figures: dict[str, Any] = {"devices": n, "heartbeats_within_s": seconds}
    runs = [await one(n, seconds, "sqlite", "", 1, "")]
    runs.append(await one(n, seconds, "sqlite", "", 3, "presence"))
    with _cluster() as cluster:
        if cluster is None:
            figures["postgresql"] = "skipped: no PostgreSQL here (apt-get install postgresql)"
        else:
            for count in (1, 3):
                runs.append(
                    await one(n, seconds, "postgresql", cluster.new_database(), count, "presence")
                )
    base = runs[0]["daemon_cpu_us_per_heartbeat"]
    for r in runs:
        r["cpu_vs_one_daemon"] = round(r["daemon_cpu_us_per_heartbeat"] / base, 2) if base else None
    figures["runs"] = runs
    return figures


def main(quick: bool = False) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.presence_cluster")
    parser.add_argument("--quick", action="store_true")
    if __name__ == "__main__":
        quick = parser.parse_args().quick
    return report("presence_cluster", asyncio.run(run(quick)))


if __name__ == "__main__":
    main()
