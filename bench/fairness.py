"""Fairness between keys: a well-behaved key's latency during another key's flood vs idle.

python -m bench fairness [--quick]

One daemon, two API keys. The polite key sends one `keys/whoami` at a time;
the flooding key keeps 256 `provision/token` requests in flight (a closed
loop, as a misbehaving service with a deep pipeline does). The polite key's
p50 and p99 are measured idle and during the flood, in the same run, with
the default per-key share (`limits.max_inflight_per_key = 16`) and with the
share as large as all the slots (what the daemon did before fair slots).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import common

FLOOD_CONCURRENCY = 256


def second_key(directory: Path) -> str:
    from provisiond import auth
    from provisiond.store import connect

    db = connect(directory / "provisiond.db")
    _, key = auth.create_key(db, org_id=1, scopes=frozenset(auth.SCOPES))
    db.conn.close()
    return key


def flood_process(port: int, key: str) -> subprocess.Popen[bytes]:
    """The flood runs in its own process, so the polite client's latency is the daemon's."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.fairness", "--flood", str(port), key],
        env=common.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


async def flood(port: int, key: str) -> None:
    await common.rpc_load(
        port, "bench/rpc/provision/token", {"orgId": 1, "ownerId": 1}, key=key,
        n=10_000_000, concurrency=FLOOD_CONCURRENCY, warmup=0, timeout=3600,
    )  # fmt: skip


async def polite_during_flood(port: int, polite: str, flooder: str, n: int) -> dict[str, Any]:
    idle = await common.rpc_load(port, "bench/rpc/keys/whoami", {}, key=polite, n=n, concurrency=1)
    proc = flood_process(port, flooder)
    try:
        await asyncio.sleep(2.0)  # the flood's pipeline is full
        loaded = await common.rpc_load(
            port, "bench/rpc/keys/whoami", {}, key=polite, n=n, concurrency=1, warmup=20
        )
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "idle": idle.summary(),
        "during_flood": loaded.summary(),
        "p50_vs_idle": common.ratio(loaded.pct(0.5), idle.pct(0.5)),
        "p99_vs_idle": common.ratio(loaded.pct(0.99), idle.pct(0.99)),
    }


async def run(quick: bool = False) -> dict[str, Any]:
    n = 300 if quick else 2000
    results: dict[str, Any] = {}
    for label, share in (
        ("fair_default_share_16", 16),
        ("share_8", 8),
        ("one_key_may_take_all_256", 256),
    ):
        with common.workdir() as d, common.mosquitto(d) as port:
            polite = common.seed(d, users=1)
            flooder = second_key(d)
            extra = f"[limits]\nmax_inflight_per_key = {share}\n"
            with common.daemon_process(common.write_config(d, port, extra=extra), d / "daemon.log"):
                await common.wait_rpc_ready(port, "bench/rpc/keys/whoami", polite)
                results[label] = await polite_during_flood(port, polite, flooder, n)
    return common.report("fairness", results)


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--flood":
        asyncio.run(flood(int(sys.argv[2]), sys.argv[3]))
    else:
        main()
