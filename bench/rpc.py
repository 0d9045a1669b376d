"""RPC throughput and latency: whoami and provision/token vs a bare echo responder,
and against the physical limit (C driver -> C echo on libmosquitto, bench/cmqtt.py).

python -m bench rpc [--quick]
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.cmqtt import Unavailable, c_echo_process, c_load
from bench.common import (
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
)  # fmt: skip


async def run(quick: bool = False) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    results: dict[str, Any] = {}
    with workdir() as d, mosquitto(d) as port:
        key = seed(d, users=1)
        # The echo gets the same request as the daemon (authorization property
        # included), so the driver and the broker do the same work for both.
        with echo_process(port, "echo/rpc"):
            await wait_rpc_ready(port, "echo/rpc", key)
            echo = await rpc_load(port, "echo/rpc", {}, key=key, n=n)
        results["echo"] = echo.summary()
        limit = None
        try:
            with c_echo_process(port, "echo-c/rpc"):
                await wait_rpc_ready(port, "echo-c/rpc", key)
                limit = await c_load(port, "echo-c/rpc", {}, key=key, n=n)
            results["c_limit"] = limit.summary()
        except Unavailable as exc:
            results["c_limit"] = f"skipped: {exc}"
        with daemon_process(write_config(d, port), d / "daemon.log"):
            await wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
            for op, body in (("keys/whoami", {}), ("provision/token", {"orgId": 1, "ownerId": 1})):
                result = await rpc_load(port, f"bench/rpc/{op}", body, key=key, n=n)
                results[op] = {
                    **result.summary(),
                    "throughput_vs_echo": ratio(result.throughput, echo.throughput),
                    "p99_vs_echo": ratio(result.pct(0.99), echo.pct(0.99)),
                }
                if limit is not None:
                    # The same figure without the Python driver's cost, against
                    # what the machine and broker carry at most.
                    c_driven = await c_load(port, f"bench/rpc/{op}", body, key=key, n=n)
                    results[f"{op} (C driver)"] = {
                        **c_driven.summary(),
                        "throughput_vs_c_limit": ratio(c_driven.throughput, limit.throughput),
                        "p99_vs_c_limit": ratio(c_driven.pct(0.99), limit.pct(0.99)),
                    }
    return report("rpc", results)


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    main()
