"""Group commit: provision/token with `[store] group_commit` off vs on, same run,
on SQLite and on PostgreSQL.

python -m bench group_commit [--quick]

Off is one transaction per request on the store thread (the path before
group commit); on lets the writes queued while the store thread is busy
share one COMMIT. Each side gets a fresh daemon process and a fresh store;
off/on pairs are interleaved so the machine's drift hits both alike. 128
requests in flight, from one key allowed 128 in flight
(`limits.max_inflight_per_key`). PostgreSQL is a throwaway cluster from
Debian's package (tests/pg_cluster.py) with its defaults: fsync and
`synchronous_commit = on`, so each COMMIT waits for its WAL flush. End to
end, the load comes from the C driver (bench/c/mqtt_load.c) when it builds;
the daemon's CPU and, on PostgreSQL, the server's CPU per request are
reported beside req/s.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.cmqtt import Unavailable, build, c_load
from bench.common import (
    daemon_process,
    mosquitto,
    pg_cluster,
    pg_cpu_seconds,
    ratio,
    report,
    rpc_load,
    seed_url,
    wait_rpc_ready,
    workdir,
    write_config,
)  # fmt: skip
from bench.grant import cpu_seconds

BODY = {"orgId": 1, "ownerId": 1}


async def store_writes(
    target: str, *, group_commit: bool, synchronous: str = "normal", n: int = 5000
) -> float:
    """`Store.write` alone (no MQTT): provision/token's transaction — a device,
    its token and a sealed replay record — from 128 concurrent writers; writes/s."""
    from provisiond import auth, devices, permissions, replay, tokens
    from provisiond.schema import all_migrations
    from provisiond.store import Store

    store = Store(target, group_commit=group_commit, synchronous=synchronous)
    await store.open(all_migrations())
    await store.call(lambda db: (auth.create_org(db, 1, "o"), auth.create_user(db, 1, 1)))
    slots = asyncio.Semaphore(128)

    def unknown_owner() -> Exception:
        return permissions.unknown_owner(org_id=1, owner_id=1)

    async def one(i: int) -> None:
        rid = f"{i:064x}"

        # As ops/provision.py and Request.write make it (pipelined on PostgreSQL).
        def tx(db: Any) -> None:
            device_id = devices.create_device(
                db, org_id=1, owner_id=1, now=1.0, owner_check=unknown_owner
            )
            tokens.issue(db, device_id, now=1.0, lifetime=3600, new_device=True)
            sealed = replay.seal("secret", rid, b'{"deviceId":%d}' % device_id)
            replay.record(db, rid, sealed, 1.0, duplicate=RuntimeError)

        async with slots:
            await store.write(tx, pipelined=True)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    await store.close()
    return round(n / elapsed, 1)


async def run(quick: bool = False, concurrency: int = 128, rounds: int = 2) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    results: dict[str, Any] = {"concurrency": concurrency}
    with workdir() as d, mosquitto(d) as port, pg_cluster() as cluster:
        # The write path alone first: what group commit changes, without the
        # MQTT load driver (which saturates first on this machine) in the way.
        alone: dict[str, Any] = {}
        targets = [("sqlite", "normal"), ("sqlite", "full")] + (
            [("postgresql", "")] if cluster is not None else []
        )
        for store, sync in targets:
            name = f"{store}{'-' + sync if sync else ''}"
            per_mode = {}
            for mode in ("off", "on"):
                target = (
                    cluster.new_database()
                    if store == "postgresql"
                    else str(d / f"alone-{name}-{mode}.db")
                )
                per_mode[mode] = await store_writes(
                    target, group_commit=mode == "on", synchronous=sync or "normal",
                    n=2000 if quick else 5000,
                )  # fmt: skip
            alone[name] = {
                "off_writes_per_s": per_mode["off"],
                "on_writes_per_s": per_mode["on"],
                "gain": ratio(per_mode["on"], per_mode["off"]),
            }
        results["store_write_alone"] = alone
        # End to end with the C load driver where it builds: the Python driver
        # (aiomqtt) saturates before the daemon does on this machine.
        driver: Any = c_load
        try:
            build()
            results["driver"] = "C (bench/c/mqtt_load.c)"
        except Unavailable as exc:
            driver = rpc_load
            results["driver"] = f"Python (aiomqtt); C driver unavailable: {exc}"
        stores = ["sqlite"] + (["postgresql"] if cluster is not None else [])
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            s: {"off": [], "on": []} for s in stores
        }
        for round_ in range(rounds):
            for store in stores:
                for mode in ("off", "on"):
                    sub = d / f"{store}-{mode}-{round_}"
                    sub.mkdir()
                    url = (
                        cluster.new_database()
                        if store == "postgresql"
                        else f"sqlite:///{sub / 'provisiond.db'}"
                    )
                    key = seed_url(url)
                    flag = "true" if mode == "on" else "false"
                    # One key drives all the load here; the per-key in-flight
                    # bound (16 by default) would otherwise cap a batch at 16.
                    extra = (
                        f'group_commit = {flag}\nurl = "{url}"\n'
                        f"[limits]\nmax_inflight_per_key = {concurrency}\n"
                    )
                    config = write_config(sub, port, extra=extra, client_id=f"gc-{sub.name}")
                    with daemon_process(config, sub / "daemon.log") as proc:
                        await wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
                        before = cpu_seconds(proc.pid)
                        server = pg_cpu_seconds(cluster) if store == "postgresql" else 0.0
                        result = await driver(
                            port, "bench/rpc/provision/token", BODY, key=key, n=n,
                            concurrency=concurrency,
                        )  # fmt: skip
                        # The daemon's own CPU per request (warm-up included):
                        # steadier than req/s when the driver and broker saturate first.
                        cpu = cpu_seconds(proc.pid) - before
                        summary = result.summary()
                        summary["daemon_cpu_us_per_request"] = round(cpu / (n + 200) * 1e6)
                        if store == "postgresql":
                            server = pg_cpu_seconds(cluster) - server
                            summary["server_cpu_us_per_request"] = round(server / (n + 200) * 1e6)
                        summary["store"] = await _store_stats(port, key)
                    runs[store][mode].append(summary)
        for store in stores:
            best = {m: max(r["throughput_rps"] for r in rs) for m, rs in runs[store].items()}
            cpu = {
                m: min(r["daemon_cpu_us_per_request"] for r in rs) for m, rs in runs[store].items()
            }
            results[store] = {
                **runs[store],
                "best_off_cpu_us": cpu["off"],
                "best_on_cpu_us": cpu["on"],
                "best_off_rps": best["off"],
                "best_on_rps": best["on"],
                "gain": ratio(best["on"], best["off"]),
            }
        if "postgresql" in results:
            results["postgresql_vs_sqlite_on"] = ratio(
                results["postgresql"]["best_on_rps"], results["sqlite"]["best_on_rps"]
            )
    return report("group_commit", results)


async def _store_stats(port: int, key: str) -> dict[str, Any]:
    """The daemon's own commit figures (`daemon/stats` → store)."""
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
