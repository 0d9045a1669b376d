"""RPC throughput and latency: whoami and provision/token vs a bare echo responder.

python -m bench rpc [--quick]
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import common


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
        with common.daemon_process(common.write_config(d, port), d / "daemon.log"):
            await common.wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
            for op, body in (("keys/whoami", {}), ("provision/token", {"orgId": 1, "ownerId": 1})):
                result = await common.rpc_load(port, f"bench/rpc/{op}", body, key=key, n=n)
                results[op] = common.versus_echo(result, echo)
    return common.report("rpc", results)


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    main()
