"""provision/token end to end, this tree's daemon vs an earlier commit's, on SQLite
and on PostgreSQL, driven by the C load driver, interleaved in one run.

    python -m bench.versus_store --base REV [--rounds 4] [--n 3000]

`bench.versus` does the same for SQLite with the Python driver, which
saturates before the daemon does; this one uses `bench/c/mqtt_load.c` (128 in
flight from one key allowed 128 in flight), a fresh store per figure, the
order of the two trees alternating by round, and reports the daemon's CPU and
(on PostgreSQL) the server's CPU per request beside req/s and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path
from typing import Any

from bench import common
from bench.cmqtt import c_load
from bench.grant import cpu_seconds
from bench.versus import tree

BODY = {"orgId": 1, "ownerId": 1}
CONCURRENCY = 128


async def _one(
    d: Path, port: int, code: Path, url: str, name: str, n: int, cluster: Any
) -> dict[str, Any]:
    sub = d / name
    sub.mkdir()
    key = common.seed_url(url)
    extra = f'url = "{url}"\n[limits]\nmax_inflight_per_key = {CONCURRENCY}\n'
    config = common.write_config(sub, port, extra=extra, client_id=f"vs-{name}")
    with common.daemon_process(config, sub / "daemon.log", code=code) as proc:
        await common.wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
        cpu, server = cpu_seconds(proc.pid), common.pg_cpu_seconds(cluster) if cluster else 0.0
        result = await c_load(
            port, "bench/rpc/provision/token", BODY, key=key, n=n, concurrency=CONCURRENCY
        )
        out = result.summary()
        # Warm-up (200) included, as in bench group_commit.
        out["daemon_cpu_us"] = round((cpu_seconds(proc.pid) - cpu) / (n + 200) * 1e6)
        if cluster is not None:
            server = common.pg_cpu_seconds(cluster) - server
            out["server_cpu_us"] = round(server / (n + 200) * 1e6)
    return out


async def run(base: str, rounds: int = 4, n: int = 3000) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with (
        tree(base) as old,
        common.workdir() as d,
        common.mosquitto(d) as port,
        common.pg_cluster() as cluster,
    ):
        codes = [("head", common.ROOT), ("base", old)]
        stores = ["sqlite"] + (["postgresql"] if cluster is not None else [])
        for round_ in range(rounds):
            for store in stores:
                for name, code in codes if round_ % 2 == 0 else codes[::-1]:
                    tag = f"{store}-{name}-{round_}"
                    url = (
                        cluster.new_database()
                        if store == "postgresql"
                        else f"sqlite:///{d / (tag + '.db')}"
                    )
                    pg = cluster if store == "postgresql" else None
                    result = await _one(d, port, code, url, tag, n, pg)
                    runs.setdefault(store, {}).setdefault(name, []).append(result)
    results: dict[str, Any] = {"base": base, "rounds": runs}
    for store, by_tree in runs.items():
        median = {
            name: statistics.median(r["throughput_rps"] for r in rs) for name, rs in by_tree.items()
        }
        results[f"{store}_head_vs_base_median"] = common.ratio(median["head"], median["base"])
        results[f"{store}_median_rps"] = median
    if "postgresql" in runs:
        results["postgresql_vs_sqlite_head_median"] = common.ratio(
            results["postgresql_median_rps"]["head"], results["sqlite_median_rps"]["head"]
        )
    return common.report("versus_store", results)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.versus_store", description=__doc__)
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(run(args.base, args.rounds, args.n))


if __name__ == "__main__":
    main()
