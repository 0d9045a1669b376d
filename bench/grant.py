"""WiFi grant RPC throughput and latency vs a bare aiomqtt echo responder.

    python -m bench grant [--quick]
    python -m bench.grant [--quick] [--n 10000] [--concurrency 32] [--log-level info]

Starts its own mosquitto, the echo responder and the real daemon (each its
own process), and drives `P/rpc/wifi-config/grant` in server-generated and
end-to-end mode with the same load driver through the same broker. Prints
throughput, p50/p99 and the ratios to echo (goal: >= 0.9x throughput,
p99 <= 1.5x echo p99). The daemon logs at `info`, so the one line per request
a production daemon writes is part of the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    LoadResult,
    daemon_process,
    echo_process,
    mosquitto,
    ratio,
    report,
    rpc_load,
    seed,
    wait_rpc_ready,
    workdir,
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


async def load(pid: int, *args: Any, **kwargs: Any) -> tuple[LoadResult, float]:
    """`rpc_load`, plus the responder's CPU microseconds per request (warm-up included)."""
    before = cpu_seconds(pid)
    result = await rpc_load(*args, **kwargs)
    total = result.n + kwargs.get("warmup", 200)
    return result, round((cpu_seconds(pid) - before) / total * 1e6)


def figures(result: LoadResult, echo: LoadResult) -> dict[str, Any]:
    thr = ratio(result.throughput, echo.throughput)
    p99 = ratio(result.pct(0.99), echo.pct(0.99))
    return {
        **result.summary(),
        "throughput_vs_echo": thr,
        "p99_vs_echo": p99,
        "goal_met": thr >= GOAL_THROUGHPUT and p99 <= GOAL_P99,
    }


async def run(
    quick: bool = False,
    *,
    n: int | None = None,
    concurrency: int = 32,
    log_level: str = "info",
) -> dict[str, Any]:
    n = n or (2000 if quick else 10_000)
    results: dict[str, Any] = {"n": n, "concurrency": concurrency, "daemon_log_level": log_level}
    with workdir() as d, mosquitto(d) as port:
        body_echo = {"device_id": 1, "expires_in_seconds": 900}
        with echo_process(port, "echo/rpc") as echo_proc:
            await wait_rpc_ready(port, "echo/rpc", None)
            echo, cpu = await load(
                echo_proc.pid, port, "echo/rpc", body_echo, key=None, n=n, concurrency=concurrency
            )
        results["echo"] = {**echo.summary(), "cpu_us_per_request": cpu}

        key = seed(d, users=1)
        device_id = seed_wifi_device(d)
        config = write_config(d, port, log_level=log_level)
        topic = "bench/rpc/wifi-config/grant"
        with daemon_process(config, d / "daemon.log") as proc:
            await wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
            # The router's floor: an authenticated op that does no work of its own.
            floor, cpu = await load(
                proc.pid, port, "bench/rpc/keys/whoami", {}, key=key, n=n, concurrency=concurrency
            )
            results["whoami_floor"] = {**figures(floor, echo), "cpu_us_per_request": cpu}
            bodies = {
                "grant_server_generated": {"device_id": device_id},
                "grant_e2e": {"device_id": device_id, "app_public_key": app_public_key()},
            }
            for name, body in bodies.items():
                result, cpu = await load(
                    proc.pid, port, topic, body, key=key, n=n, concurrency=concurrency
                )
                results[name] = {**figures(result, echo), "cpu_us_per_request": cpu}

        # Echo again after the daemon: the baseline is the better of the two,
        # so a machine that warmed up (or slowed down) never flatters the daemon.
        with echo_process(port, "echo/rpc") as echo_proc:
            await wait_rpc_ready(port, "echo/rpc", None)
            echo2, cpu = await load(
                echo_proc.pid, port, "echo/rpc", body_echo, key=None, n=n, concurrency=concurrency
            )
        results["echo_after"] = {**echo2.summary(), "cpu_us_per_request": cpu}
        if echo2.throughput > echo.throughput:
            for name in ("whoami_floor", "grant_server_generated", "grant_e2e"):
                tput = results[name]["throughput_rps"]
                p99 = results[name]["p99_ms"]
                results[name]["throughput_vs_echo"] = ratio(tput, echo2.throughput)
                results[name]["p99_vs_echo"] = ratio(p99, echo2.pct(0.99))
                results[name]["goal_met"] = (
                    results[name]["throughput_vs_echo"] >= GOAL_THROUGHPUT
                    and results[name]["p99_vs_echo"] <= GOAL_P99
                )
    return report("grant", results)


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.grant", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    args = parser.parse_args()
    asyncio.run(run(args.quick, n=args.n, concurrency=args.concurrency, log_level=args.log_level))
