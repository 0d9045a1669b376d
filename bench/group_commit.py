"""Group commit: provision/token with `[store] group_commit` off vs on, same run.

python -m bench group_commit [--quick]

Off is one `BEGIN IMMEDIATE` transaction per request on the store thread (the
path before group commit); on lets the writes queued while the store thread
is busy share one COMMIT. 128 requests in flight, from one key allowed 128
in flight (`limits.max_inflight_per_key`). Each side gets a fresh daemon process and store;
the pair is run twice, interleaved, so the machine's drift hits both alike.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.common import (
    daemon_process,
    mosquitto,
    ratio,
    report,
    rpc_load,
    seed,
    wait_rpc_ready,
    workdir,
    write_config,
)  # fmt: skip

BODY = {"orgId": 1, "ownerId": 1}


async def run(quick: bool = False, concurrency: int = 128, rounds: int = 2) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    commits: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with workdir() as d, mosquitto(d) as port:
        for round_ in range(rounds):
            for mode in ("off", "on"):
                sub = d / f"{mode}-{round_}"
                sub.mkdir()
                key = seed(sub, users=1)
                flag = "true" if mode == "on" else "false"
                # One key drives all the load here; the per-key in-flight bound
                # (16 by default) would otherwise cap a batch at 16, as if
                # `concurrency / 16` keys were not sending at once.
                extra = f"group_commit = {flag}\n[limits]\nmax_inflight_per_key = {concurrency}\n"
                config = write_config(sub, port, extra=extra, client_id=f"gc-{mode}-{round_}")
                with daemon_process(config, sub / "daemon.log"):
                    await wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
                    result = await rpc_load(
                        port, "bench/rpc/provision/token", BODY, key=key, n=n,
                        concurrency=concurrency,
                    )  # fmt: skip
                    commits[mode].append(await _store_stats(port, key))
                runs[mode].append(result.summary())
    best = {mode: max(r["throughput_rps"] for r in rs) for mode, rs in runs.items()}
    return report(
        "group_commit",
        {
            "concurrency": concurrency,
            "off": runs["off"],
            "on": runs["on"],
            "store": commits,
            "best_off_rps": best["off"],
            "best_on_rps": best["on"],
            "gain": ratio(best["on"], best["off"]),
        },
    )


async def _store_stats(port: int, key: str) -> dict[str, Any]:
    """The daemon's own commit figures (`daemon/stats` → store)."""
    import json

    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("bench-stats", qos=1)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "bench-stats"
        props.CorrelationData = b"stats"
        props.UserProperty = ("authorization", f"Bearer {key}")
        await client.publish("bench/rpc/daemon/stats", b"{}", qos=1, properties=props)
        async for message in client.messages:
            stats: dict[str, Any] = json.loads(message.payload)["body"]["store"]  # type: ignore[arg-type]
            return stats
    return {}


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    main()
