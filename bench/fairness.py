"""Fairness between keys: a well-behaved key's latency during another key's flood vs idle.

python -m bench fairness [--quick]
python -m bench.fairness [--quick] [--driver c|python]

One daemon, two API keys. The polite key sends one `keys/whoami` at a time;
the flooding key keeps 256 `provision/token` requests in flight (a closed
loop, as a misbehaving service with a deep pipeline does). The polite key's
p50 and p99 are measured idle and during the flood, in the same run, with
the defaults (`limits.max_inflight_per_key = 16`, `store.thread_priority =
"background"`), with the store thread at normal priority, with a smaller
share (4), and with the share as large as all the slots (what the daemon did
before fair slots).
A third daemon takes a flood 1500 deep, more than the broker lets the
daemon hold unacknowledged (`mqtt.receive_maximum = 1000`): what no share
inside the daemon can help, since the polite request then queues at the
broker behind the flood's.

Idle and flood segments alternate, several rounds each, and the figures pool
each kind's rounds: on a machine shared with other work, a burst of someone
else's load then falls on both kinds alike instead of on one segment.

Both load drivers are the C ones on libmosquitto (`bench/c/mqtt_load.c`,
built on first use) unless `--driver python` or no C toolchain: the Python
drivers spent about one of this 2-core machine's cores (the flood ~80 %, the
polite key ~25 %), competing with the daemon they measure.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cmqtt, common

FLOOD_CONCURRENCY = 256
FLOOD_TOPIC = "bench/rpc/provision/token"
FLOOD_BODY = {"orgId": 1, "ownerId": 1}
POLITE_TOPIC = "bench/rpc/keys/whoami"
# (label, limits.max_inflight_per_key, store.thread_priority, flood concurrency)
CONFIGS = (
    ("fair_default_share_16", 16, "background", FLOOD_CONCURRENCY),
    # What the store thread's lower priority buys (the default before 2026-12-03).
    ("store_thread_normal", 16, "normal", FLOOD_CONCURRENCY),
    ("smaller_share_4", 4, "background", FLOOD_CONCURRENCY),
    ("one_key_may_take_all_256", 256, "background", FLOOD_CONCURRENCY),
    # Deeper than the broker's window to the daemon (mqtt.receive_maximum
    # 1000): the polite request queues at the broker behind the flood's.
    ("deep_flood_1500_share_16", 16, "background", 1500),
)
# A polite segment that takes longer than this is reported as starved.
POLITE_TIMEOUT = 30
# Seconds for the flood's pipeline to fill, and for its leftovers to drain.
SETTLE = 1.0

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


async def interleaved(
    directory: Path, port: int, keys: tuple[str, str], drive: tuple[Load, Flood], **shape: Any
) -> dict[str, Any]:
    """Rounds of (idle segment, flood segment) for the polite key; pooled and per round."""
    polite, flooder = keys
    load, start_flood = drive
    idle: list[common.LoadResult] = []
    loaded: list[common.LoadResult] = []
    flood_rps: list[float] = []
    polite_load: dict[str, Any] = {
        "key": polite, "n": shape["n"], "concurrency": 1, "warmup": 20, "timeout": POLITE_TIMEOUT,
    }  # fmt: skip
    for _ in range(shape["rounds"]):
        idle.append(await load(port, POLITE_TOPIC, {}, **polite_load))
        proc = start_flood(port, flooder, directory, shape["depth"])
        try:
            await asyncio.sleep(SETTLE)  # the flood's pipeline is full
            since = time.time()
            try:
                loaded.append(await load(port, POLITE_TOPIC, {}, **polite_load))
            except (TimeoutError, RuntimeError) as exc:
                return {"polite_starved": f"{shape['n']} requests not answered in "
                        f"{POLITE_TIMEOUT} s during the flood: {exc}"}  # fmt: skip
            until = time.time()
        finally:
            proc.terminate()
            proc.wait(10)
        flood_rps.append(round(tokens_issued(directory, since, until) / (until - since), 1))
        await asyncio.sleep(SETTLE)  # requests it left in the daemon are answered
    return summary(idle, loaded, flood_rps)


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


async def run(quick: bool = False, driver: str = "c", n: int | None = None) -> dict[str, Any]:
    per_segment, rounds = (1000, 3) if quick else (3000, 4)
    n = n or per_segment
    name, load, start_flood = drivers(driver)
    results: dict[str, Any] = {"drivers": name, "rounds": rounds, "per_segment": n}
    for label, share, priority, depth in CONFIGS:
        with common.workdir() as d, common.mosquitto(d) as port:
            polite = common.seed(d, users=1)
            flooder = second_key(d)
            # `extra` continues the [store] table.
            extra = f'thread_priority = "{priority}"\n[limits]\nmax_inflight_per_key = {share}\n'
            with common.daemon_process(common.write_config(d, port, extra=extra), d / "daemon.log"):
                await common.wait_rpc_ready(port, POLITE_TOPIC, polite)
                results[label] = await interleaved(
                    d, port, (polite, flooder), (load, start_flood),
                    n=n, rounds=rounds, depth=depth,
                )  # fmt: skip
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
