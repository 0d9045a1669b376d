"""Fairness between keys: a well-behaved key's latency during another key's flood vs idle.

python -m bench fairness [--quick]
python -m bench.fairness [--quick] [--driver c|python]

One daemon, two API keys. The polite key sends one `keys/whoami` at a time;
the flooding key keeps 256 `provision/token` requests in flight (a closed
loop, as a misbehaving service with a deep pipeline does). The polite key's
p50 and p99 are measured idle and during the flood, in the same run, with
the defaults (`limits.max_inflight_per_key = 16`,
`limits.shared_inflight_per_key = 4`, `store.thread_priority =
"background"`), without the smaller bound while shared, with the store thread
at normal priority, and with the share as large as all the slots (what the
daemon did before fair slots).
One more daemon takes a flood 1500 deep, more than the broker lets the
daemon hold unacknowledged (`mqtt.receive_maximum = 1000`): what no share
inside the daemon can help, since the polite request then queues at the
broker behind the flood's.

Each round also counts the flood's tokens per second while it runs alone
(2 s, no polite request), next to its rate during the polite segment: what
each setting costs a key that is the only one asking, in the same run.

Idle and flood segments alternate, several rounds each, and the figures pool
each kind's rounds: on a machine shared with other work, a burst of someone
else's load then falls on both kinds alike instead of on one segment. Each
round starts every daemon afresh (with a broker of its own), and the rounds
go round the daemons, each round starting from the next one: with each
daemon's rounds run back to back instead, the first daemon's idle p99 came
out up to twice the others', which flattered whichever daemon ran first.
A segment measured right after a daemon's start, or after the last
round's files were deleted, has a p99 several times a quiet one's, the C
echo's too (this machine is a VM: written-back files cost it CPU time), so
each round waits for the disk (`sync`) and for `QUIET` seconds first.

The physical floor is measured in the same rounds: a C echo responder
(`bench/c/mqtt_echo.c`) on a topic of its own answers the polite key's
requests, idle and during the same flood, through the same broker. Its p99
during the flood is what the broker and this machine's cores impose on any
responder while the daemon serves the flood; what the daemon adds beyond it
is its own (`p99_over_floor_ms`), and the floor's p99 during the flood over
the daemon's idle p99 (`floor_p99_vs_daemon_idle_p99`) is the best ratio any
responder could show in that run. Within a round the daemon's and the
floor's segments alternate which goes first.

Both load drivers are the C ones on libmosquitto (`bench/c/mqtt_load.c`,
built on first use) unless `--driver python` or no C toolchain: the Python
drivers spent about one of this 2-core machine's cores (the flood ~80 %, the
polite key ~25 %), competing with the daemon they measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cmqtt, common

FLOOD_CONCURRENCY = 256
FLOOD_TOPIC = "bench/rpc/provision/token"
FLOOD_BODY = {"orgId": 1, "ownerId": 1}
POLITE_TOPIC = "bench/rpc/keys/whoami"
# The floor's echo responder listens here (outside the daemon's prefix).
FLOOR_TOPIC = "bench-floor/echo"
# (label, limits.max_inflight_per_key, limits.shared_inflight_per_key,
#  store.thread_priority, flood concurrency)
CONFIGS = (
    ("fair_defaults_16_shared_4", 16, 4, "background", FLOOD_CONCURRENCY),
    # What the smaller bound while shared buys (no such bound before 2026-12-03).
    ("no_shared_bound_16", 16, 16, "background", FLOOD_CONCURRENCY),
    # What the store thread's lower priority buys (the default before 2026-12-03).
    ("store_thread_normal", 16, 4, "normal", FLOOD_CONCURRENCY),
    ("one_key_may_take_all_256", 256, 256, "background", FLOOD_CONCURRENCY),
    # Deeper than the broker's window to the daemon (mqtt.receive_maximum
    # 1000): the polite request queues at the broker behind the flood's.
    ("deep_flood_1500", 16, 4, "background", 1500),
)
# A polite segment slower than this many seconds, or this many per request
# (the share-less daemon answers ~50/s during the flood, slow but not starved),
# is reported as starved.
POLITE_TIMEOUT = 60
POLITE_TIMEOUT_PER_REQUEST = 0.03
# Seconds for the flood's pipeline to fill, and for its leftovers to drain.
SETTLE = 1.0
# Seconds the flood runs alone (no polite requests) in each round.
ALONE = 2.0
# Seconds of quiet between a daemon's start and its first measured request.
QUIET = 3.0

Load = Callable[..., Any]
Flood = Callable[[int, str, Path, int], subprocess.Popen[bytes]]


def second_key(directory: Path) -> str:
    from provisiond import auth
    from provisiond.store import connect

    db = connect(directory / "provisiond.db")
    _, key = auth.create_key(db, org_id=1, scopes=frozenset(auth.SCOPES))
    db.conn.close()
    return key


def python_flood(port: int, key: str, _directory: Path, depth: int) -> subprocess.Popen[bytes]:
    """The flood runs in its own process, so the polite client's latency is the daemon's."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.fairness", "--flood", str(port), key, str(depth)],
        env=common.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


def c_flood(port: int, key: str, directory: Path, depth: int) -> subprocess.Popen[bytes]:
    """The same closed loop as `flood`, from the C driver (no warm-up, run until stopped)."""
    body = directory / "flood.json"
    body.write_text(json.dumps(FLOOD_BODY))
    return subprocess.Popen(
        [str(cmqtt.build() / "mqtt_load"), str(port), FLOOD_TOPIC, str(body), key,
         "10000000", str(depth), "0", "3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


async def flood(port: int, key: str, depth: int) -> None:
    await common.rpc_load(
        port, FLOOD_TOPIC, FLOOD_BODY, key=key,
        n=10_000_000, concurrency=depth, warmup=0, timeout=3600,
    )  # fmt: skip


def drivers(choice: str) -> tuple[str, Load, Flood]:
    """(name, polite load, flood process): the C drivers when they can be built."""
    if choice == "c":
        try:
            cmqtt.build()
            return "c", cmqtt.c_load, c_flood
        except cmqtt.Unavailable as exc:
            print(f"fairness: C drivers unavailable ({exc}); using the Python drivers")
    return "python", common.rpc_load, python_flood


def tokens_issued(directory: Path, since: float, until: float) -> int:
    """Provision tokens the daemon stored in [since, until]: the flood's own throughput."""
    from provisiond.store import connect

    db = connect(directory / "provisiond.db")
    try:
        row = db.execute(
            "SELECT count(*) FROM provision_tokens WHERE created_at BETWEEN ? AND ?", [since, until]
        ).fetchone()
    finally:
        db.conn.close()
    return int(row[0])


def pooled(results: list[common.LoadResult]) -> common.LoadResult:
    latencies = [x for r in results for x in r.latencies_ms]
    statuses: dict[int, int] = {}
    for r in results:
        for status, count in r.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    return common.LoadResult(len(latencies), sum(r.seconds for r in results), latencies, statuses)


@dataclass
class Setup:
    """One daemon's broker, store and keys, for one round."""

    directory: Path
    port: int
    polite: str
    flooder: str


@dataclass
class Subject:
    """One daemon configuration, and what its rounds measured."""

    label: str
    share: int
    shared: int
    priority: str
    depth: int
    idle: dict[str, list[common.LoadResult]] = field(default_factory=dict)
    loaded: dict[str, list[common.LoadResult]] = field(default_factory=dict)
    flood_rps: list[float] = field(default_factory=list)
    alone_rps: list[float] = field(default_factory=list)
    starved: str | None = None


async def one_round(
    subject: Subject, setup: Setup, drive: tuple[Load, Flood], topics: tuple[str, ...], n: int
) -> None:
    """An idle segment, then the flood alone, then a segment during the flood.

    Each segment runs once per topic (the daemon's, and the floor's echo),
    in the order given.
    """
    load, start_flood = drive
    timeout = max(POLITE_TIMEOUT, POLITE_TIMEOUT_PER_REQUEST * (n + 20))
    polite_load: dict[str, Any] = {
        "key": setup.polite, "n": n, "concurrency": 1, "warmup": 20, "timeout": timeout,
    }  # fmt: skip
    port, directory = setup.port, setup.directory
    for topic in topics:
        subject.idle.setdefault(topic, []).append(await load(port, topic, {}, **polite_load))
    proc = start_flood(port, setup.flooder, directory, subject.depth)
    try:
        await asyncio.sleep(SETTLE)  # the flood's pipeline is full
        # The flood's own rate with nobody else asking: what a key alone gets.
        alone_from = time.time()
        await asyncio.sleep(ALONE)
        subject.alone_rps.append(
            round(tokens_issued(directory, alone_from, time.time()) / ALONE, 1)
        )
        since = time.time()
        for topic in topics:
            try:
                result = await load(port, topic, {}, **polite_load)
            except (TimeoutError, RuntimeError) as exc:
                subject.starved = f"{n} requests to {topic} not answered in {timeout:.0f} s during the flood: {exc}"
                return
            subject.loaded.setdefault(topic, []).append(result)
        until = time.time()
    finally:
        proc.terminate()
        proc.wait(10)
    subject.flood_rps.append(round(tokens_issued(directory, since, until) / (until - since), 1))
    await asyncio.sleep(SETTLE)  # requests it left in the daemon are answered


def figures(subject: Subject, floor: bool) -> dict[str, Any]:
    """The polite key's figures pooled over the rounds, and the floor's beside them."""
    if subject.starved is not None:
        return {"polite_starved": subject.starved}
    idle, loaded = subject.idle, subject.loaded
    result = summary(idle[POLITE_TOPIC], loaded[POLITE_TOPIC], subject.flood_rps)
    result["within_2x_of_idle"] = {
        "p50": result["p50_vs_idle"] <= 2,
        "p99": result["p99_vs_idle"] <= 2,
    }
    if floor:
        echo = summary(idle[FLOOR_TOPIC], loaded[FLOOR_TOPIC], [])
        del echo["flood_tokens_per_s"]
        result["floor"] = echo
        result["p99_over_floor_ms"] = {
            kind: round(
                pooled(mine[POLITE_TOPIC]).pct(0.99) - pooled(mine[FLOOR_TOPIC]).pct(0.99), 2
            )
            for kind, mine in (("idle", idle), ("during_flood", loaded))
        }
        # The ratio a daemon would show if it added nothing to the floor
        # during the flood: the most any responder could do on this machine.
        result["floor_p99_vs_daemon_idle_p99"] = common.ratio(
            pooled(loaded[FLOOR_TOPIC]).pct(0.99), pooled(idle[POLITE_TOPIC]).pct(0.99)
        )
    return {**result, "flood_alone_tokens_per_s": subject.alone_rps}


def summary(
    idle: list[common.LoadResult], loaded: list[common.LoadResult], flood_rps: list[float]
) -> dict[str, Any]:
    all_idle, all_loaded = pooled(idle), pooled(loaded)
    return {
        "idle": all_idle.summary(),
        "during_flood": all_loaded.summary(),
        "p50_vs_idle": common.ratio(all_loaded.pct(0.5), all_idle.pct(0.5)),
        "p99_vs_idle": common.ratio(all_loaded.pct(0.99), all_idle.pct(0.99)),
        "flood_tokens_per_s": flood_rps,
        "rounds_p50_p99_ms": [
            {
                "idle": [round(i.pct(0.5), 2), round(i.pct(0.99), 2)],
                "flood": [round(f.pct(0.5), 2), round(f.pct(0.99), 2)],
            }
            for i, f in zip(idle, loaded, strict=True)
        ],
    }


async def start(running: contextlib.ExitStack, subject: Subject, floor: bool) -> Setup:
    """A broker, a seeded store and a daemon of `subject`'s settings, ready to answer."""
    d = running.enter_context(common.workdir())
    port = running.enter_context(common.mosquitto(d))
    polite = common.seed(d, users=1)
    flooder = second_key(d)
    # `extra` continues the [store] table.
    extra = (
        f'thread_priority = "{subject.priority}"\n[limits]\n'
        f"max_inflight_per_key = {subject.share}\nshared_inflight_per_key = {subject.shared}\n"
    )
    running.enter_context(
        common.daemon_process(common.write_config(d, port, extra=extra), d / "daemon.log")
    )
    if floor:
        running.enter_context(cmqtt.c_echo_process(port, FLOOR_TOPIC))
        await common.wait_rpc_ready(port, FLOOR_TOPIC, polite)
    await common.wait_rpc_ready(port, POLITE_TOPIC, polite)
    # The last round's teardown (files deleted, written back) and this
    # daemon's start-up work are over before anything is measured.
    os.sync()
    await asyncio.sleep(QUIET)
    return Setup(d, port, polite, flooder)


async def run(quick: bool = False, driver: str = "c", n: int | None = None) -> dict[str, Any]:
    per_segment, rounds = (1000, 3) if quick else (3000, 4)
    n = n or per_segment
    name, load, start_flood = drivers(driver)
    results: dict[str, Any] = {"drivers": name, "rounds": rounds, "per_segment": n}
    floor = name == "c"
    if not floor:
        results["floor"] = "not measured: the C echo responder needs the C drivers"
    subjects = [Subject(*config) for config in CONFIGS]
    topics = (POLITE_TOPIC, FLOOR_TOPIC) if floor else (POLITE_TOPIC,)
    for round_no in range(rounds):
        # Rounds go round the daemons, each round from the next one, so that
        # neither the time nor the place in a round favours one.
        turn = subjects[round_no % len(subjects) :] + subjects[: round_no % len(subjects)]
        order = topics if round_no % 2 == 0 else topics[::-1]
        for subject in turn:
            if subject.starved is None:
                with contextlib.ExitStack() as running:
                    setup = await start(running, subject, floor)
                    await one_round(subject, setup, (load, start_flood), order, n)
    for subject in subjects:
        results[subject.label] = figures(subject, floor)
    return common.report("fairness", results)


def main(quick: bool = False, driver: str = "c", n: int | None = None) -> dict[str, Any]:
    return asyncio.run(run(quick, driver, n))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--flood":
        asyncio.run(flood(int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
    else:
        parser = common.arg_parser("python -m bench.fairness", __doc__)
        parser.add_argument("--driver", choices=["c", "python"], default="c")
        args = parser.parse_args()
        main(args.quick, args.driver, args.n)
