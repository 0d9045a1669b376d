"""WiFi grant RPC throughput and latency vs a bare aiomqtt echo responder, on
both MQTT backends of the daemon, and against the physical limit (a C echo
driven by a C load driver on libmosquitto, bench/cmqtt.py).

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
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.cmqtt import Unavailable, build, c_echo_process, c_load
from bench.common import (
    ROOT,
    LoadResult,
    arg_parser,
    daemon_process,
    echo_process,
    ratio,
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
        grant_aiomqtt = "bench-aiomqtt/rpc/wifi-config/grant"
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
            # The same daemon and store on the compatibility backend ([mqtt]
            # client = "aiomqtt"), its own prefix and client id, same driver.
            "grant_server_generated_aiomqtt": (grant_aiomqtt, {"device_id": device_id}),
            "grant_e2e_aiomqtt": (grant_aiomqtt, e2e_body),
        }
        # Driven by the C load driver: the physical limit (C echo) and the
        # daemon's grant without the Python driver's own cost.
        c_figures = {"c_limit": ("echo-c/rpc", e2e_body), "grant_e2e_c_driver": (grant, e2e_body)}
        try:
            build()
        except Unavailable as exc:
            results["c_limit"] = f"skipped: {exc}"
            c_figures = {}
        config = write_config(d, port, log_level=log_level)
        config_aiomqtt = write_config(
            d, port, log_level=log_level, client="aiomqtt", prefix="bench-aiomqtt",
            client_id="provisiond-bench-aiomqtt", filename="provisiond-aiomqtt.toml",
        )  # fmt: skip
        with contextlib.ExitStack() as stack:
            echo_proc = stack.enter_context(echo_process(port, "echo/rpc"))
            own_proc = stack.enter_context(echo_process(port, "echo-own/rpc", client="provisiond"))
            daemon_proc = stack.enter_context(daemon_process(config, d / "daemon.log"))
            aiomqtt_proc = stack.enter_context(
                daemon_process(config_aiomqtt, d / "daemon-aiomqtt.log")
            )
            pids = {
                "echo": echo_proc.pid,
                "echo_own_client": own_proc.pid,
                "grant_server_generated_aiomqtt": aiomqtt_proc.pid,
                "grant_e2e_aiomqtt": aiomqtt_proc.pid,
            }
            if c_figures:
                pids["c_limit"] = stack.enter_context(c_echo_process(port, "echo-c/rpc")).pid
                await wait_rpc_ready(port, "echo-c/rpc", key)
            await wait_rpc_ready(port, "echo/rpc", key)
            await wait_rpc_ready(port, "echo-own/rpc", key)
            await wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
            await wait_rpc_ready(port, "bench-aiomqtt/rpc/keys/whoami", key)
            every = {**figures_to_run, **c_figures}
            samples: dict[str, list[LoadResult]] = {name: [] for name in every}
            cpu: dict[str, float] = dict.fromkeys(every, 0.0)
            for _ in range(rounds):
                for name, (topic, body) in every.items():
                    pid = pids.get(name, daemon_proc.pid)
                    drive = c_load if name in c_figures else rpc_load
                    before = cpu_seconds(pid)
                    samples[name].append(
                        await drive(
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
            if name in ("echo_own_client", "c_limit", "grant_e2e_c_driver"):
                del base["goal_met"]  # a reference, not a figure with a goal
            if "c_limit" in merged and name != "c_limit":
                limit = merged["c_limit"]
                base["throughput_vs_c_limit"] = ratio(result.throughput, limit.throughput)
                base["p99_vs_c_limit"] = ratio(result.pct(0.99), limit.pct(0.99))
            results[name] = {**base, "cpu_us_per_request": per_request}
        if "grant_e2e_aiomqtt" in merged:
            native, compat = merged["grant_e2e"], merged["grant_e2e_aiomqtt"]
            results["native_vs_aiomqtt_backend_e2e"] = {
                "throughput": ratio(native.throughput, compat.throughput),
                "p99": ratio(native.pct(0.99), compat.pct(0.99)),
            }
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
