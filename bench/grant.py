"""WiFi grant RPC throughput and latency vs a bare aiomqtt echo responder.

    python -m bench grant [--quick]
    python -m bench.grant [--quick] [--n 10000] [--rounds 5] [--concurrency 32] [--log-level info]

Starts its own mosquitto, the echo responder and the real daemon (each its
own process), and drives `P/rpc/wifi-config/grant` in server-generated and
end-to-end mode with the same load driver through the same broker. Prints
throughput, p50/p99 and the ratios to echo (goal: >= 0.9x throughput,
p99 <= 1.5x echo p99). The daemon logs at `info`, so the one line per request
a production daemon writes is part of the cost.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    LoadResult,
    arg_parser,
    daemon_process,
    echo_process,
    report,
    rpc_load,
    seeded_broker,
    versus_echo,
    wait_rpc_ready,
    write_config,
)

GOAL_THROUGHPUT = 0.9
GOAL_P99 = 1.5


def seed_wifi_device(directory: Path) -> int:
    """One activated WiFi device (the provisioning flow is not under test here)."""
    sys.path.insert(0, str(ROOT / "daemon"))
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from provisiond.store import connect

    db = connect(directory / "provisiond.db")
    now = time.time()
    public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    cur = db.execute(
        "INSERT INTO devices (org_id, owner_id, state, capabilities, public_key, created_at,"
        " activated_at) VALUES (1, 1, 'active', 3, ?, ?, ?)",
        [public, now, now],
    )
    device_id = int(cur.lastrowid or 0)
    db.conn.close()
    return device_id


def app_public_key() -> str:
    sys.path.insert(0, str(ROOT / "daemon"))
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from provisiond.wifi.crypto import b64url_encode

    return b64url_encode(X25519PrivateKey.generate().public_key().public_bytes_raw())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), to report CPU per request:
    on a shared machine it varies far less than throughput does."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def merge(results: list[LoadResult]) -> LoadResult:
    statuses: dict[int, int] = {}
    for r in results:
        for status, count in r.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    return LoadResult(
        sum(r.n for r in results),
        sum(r.seconds for r in results),
        [ms for r in results for ms in r.latencies_ms],
        statuses,
    )


def figures(result: LoadResult, echo: LoadResult) -> dict[str, Any]:
    doc = versus_echo(result, echo)
    doc["goal_met"] = (
        doc["throughput_vs_echo"] >= GOAL_THROUGHPUT and doc["p99_vs_echo"] <= GOAL_P99
    )
    return doc


async def run(
    quick: bool = False,
    *,
    n: int | None = None,
    rounds: int | None = None,
    concurrency: int = 32,
    log_level: str = "info",
) -> dict[str, Any]:
    """Interleaved rounds: echo, whoami, grant (server), grant (e2e), echo, ...

    This machine's speed drifts by tens of percent over a minute (a shared
    VM); measuring each figure in one block would compare the daemon with an
    echo taken at another speed. Each round measures every figure for
    n/rounds requests back to back, and the totals over all rounds are
    compared, so a slow spell weighs on all of them alike.
    """
    n = n or (2000 if quick else 10_000)
    rounds = rounds or (4 if quick else 5)
    per_round = max(1, n // rounds)
    results: dict[str, Any] = {
        "n": per_round * rounds,
        "rounds": rounds,
        "concurrency": concurrency,
        "daemon_log_level": log_level,
    }
    with seeded_broker(users=1) as (d, port, key):
        device_id = seed_wifi_device(d)
        grant = "bench/rpc/wifi-config/grant"
        e2e_body = {"device_id": device_id, "app_public_key": app_public_key()}
        # name -> (topic, body); the echo gets the same request as the daemon
        # (body and authorization property), so the driver and the broker do
        # the same work for both and the ratio is the cost of the daemon's own.
        figures_to_run = {
            "echo": ("echo/rpc", e2e_body),
            # Not a goal: the same echo on the daemon's own MQTT client, the
            # floor of the daemon's transport (see bench/echo.py).
            "echo_own_client": ("echo-own/rpc", e2e_body),
            # The router's floor: an authenticated op that does no work of its own.
            "whoami_floor": ("bench/rpc/keys/whoami", {}),
            "grant_server_generated": (grant, {"device_id": device_id}),
            "grant_e2e": (grant, e2e_body),
        }
        config = write_config(d, port, log_level=log_level)
        with (
            echo_process(port, "echo/rpc") as echo_proc,
            echo_process(port, "echo-own/rpc", client="provisiond") as own_proc,
            daemon_process(config, d / "daemon.log") as daemon_proc,
        ):
            pids = {"echo": echo_proc.pid, "echo_own_client": own_proc.pid}
            await wait_rpc_ready(port, "echo/rpc", key)
            await wait_rpc_ready(port, "echo-own/rpc", key)
            await wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
            samples: dict[str, list[LoadResult]] = {name: [] for name in figures_to_run}
            cpu: dict[str, float] = dict.fromkeys(figures_to_run, 0.0)
            for _ in range(rounds):
                for name, (topic, body) in figures_to_run.items():
                    pid = pids.get(name, daemon_proc.pid)
                    before = cpu_seconds(pid)
                    samples[name].append(
                        await rpc_load(
                            port, topic, body, key=key, n=per_round,
                            concurrency=concurrency, warmup=50,
                        )
                    )  # fmt: skip
                    cpu[name] += cpu_seconds(pid) - before
        merged = {name: merge(parts) for name, parts in samples.items()}
        echo = merged["echo"]
        for name, result in merged.items():
            # CPU per request includes each round's 50 warm-up requests.
            per_request = round(cpu[name] / (result.n + 50 * rounds) * 1e6)
            base = result.summary() if name == "echo" else figures(result, echo)
            if name == "echo_own_client":
                del base["goal_met"]  # a reference, not a figure with a goal
            results[name] = {**base, "cpu_us_per_request": per_request}
    return report("grant", results)


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    parser = arg_parser("python -m bench.grant", __doc__)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    args = parser.parse_args()
    asyncio.run(
        run(
            args.quick,
            n=args.n,
            rounds=args.rounds,
            concurrency=args.concurrency,
            log_level=args.log_level,
        )
    )
