"""RPC throughput and latency: whoami and provision/token vs a bare echo responder,
and against the physical limit (C driver -> C echo on libmosquitto, bench/cmqtt.py).

python -m bench rpc [--quick]
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import common
from bench.cmqtt import Unavailable, c_echo_process, c_load


async def run(quick: bool = False) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    results: dict[str, Any] = {}
    with common.seeded_broker(users=1) as (d, port, key):
        # The echo gets the same request as the daemon (authorization property
        # included), so the driver and the broker do the same work for both.
        with common.echo_process(port, "echo/rpc"):
            await common.wait_rpc_ready(port, "echo/rpc", key)
            echo = await common.rpc_load(port, "echo/rpc", {}, key=key, n=n)
        results["echo"] = echo.summary()
        limit = None
        try:
            with c_echo_process(port, "echo-c/rpc"):
                await common.wait_rpc_ready(port, "echo-c/rpc", key)
                limit = await c_load(port, "echo-c/rpc", {}, key=key, n=n)
            results["c_limit"] = limit.summary()
        except Unavailable as exc:
            results["c_limit"] = f"skipped: {exc}"
        with common.daemon_process(common.write_config(d, port), d / "daemon.log"):
            await common.wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
            for op, body in (("keys/whoami", {}), ("provision/token", {"orgId": 1, "ownerId": 1})):
                result = await common.rpc_load(port, f"bench/rpc/{op}", body, key=key, n=n)
                results[op] = common.versus_echo(result, echo)
                if limit is not None:
                    # The same figure without the Python driver's cost, against
                    # what the machine and broker carry at most.
                    c_driven = await c_load(port, f"bench/rpc/{op}", body, key=key, n=n)
                    results[f"{op} (C driver)"] = {
                        **c_driven.summary(),
                        "throughput_vs_c_limit": common.ratio(
                            c_driven.throughput, limit.throughput
                        ),
                        "p99_vs_c_limit": common.ratio(c_driven.pct(0.99), limit.pct(0.99)),
                    }
    return common.report("rpc", results)


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    main()
