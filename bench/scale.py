"""Horizontal scale: 1 vs 2 daemon processes on one store, RPC via a shared subscription.

    python -m bench scale [--quick]

Both processes subscribe to `$share/<group>/P/rpc/#`, so the broker splits
requests between them. On this 2-core machine the broker, the load driver and
the daemons share the cores, which caps what a second process can add; the
figure shows the mechanism works and what it buys here.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bench import common


async def run(quick: bool = False) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    results: dict[str, Any] = {}
    with common.seeded_broker() as (d, port, key):
        topic = "bench/rpc/keys/whoami"
        for processes in (1, 2):
            with contextlib.ExitStack() as stack:
                for i in range(processes):
                    sub = d / f"p{processes}-{i}"
                    sub.mkdir()
                    # The same client ids in both phases: a stopped member keeps its
                    # persistent session, and with it its share of the requests.
                    config = common.write_config(d, port, client_id=f"scale-{i}")
                    text = config.read_text().replace(
                        "[mqtt]\n", '[mqtt]\nshared_group = "bench"\n'
                    )
                    (sub / "provisiond.toml").write_text(text)
                    stack.enter_context(
                        common.daemon_process(sub / "provisiond.toml", sub / "daemon.log")
                    )
                await common.wait_rpc_ready(port, topic, key)
                await asyncio.sleep(1.0)  # let every process subscribe
                result = await common.rpc_load(port, topic, {}, key=key, n=n, concurrency=64)
                results[f"{processes}_process"] = result.summary()
        results["throughput_2_vs_1"] = common.ratio(
            results["2_process"]["throughput_rps"], results["1_process"]["throughput_rps"]
        )
    return common.report("scale", results)


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    main()
