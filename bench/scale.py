"""Horizontal scale: 1 daemon on SQLite vs 1, 2 and 3 daemons on one PostgreSQL,
RPC through a shared subscription, all in one run.

    python -m bench scale [--quick]

Each daemon is its own process with its own state directory and client id,
subscribed to `$share/<group>/bench/rpc/#`; the broker splits requests between
them. PostgreSQL is a throwaway cluster from Debian's package with fsync and
`synchronous_commit = on` (its defaults); each phase gets a fresh database
(SQLite: a fresh file). Each phase measures `keys/whoami` (a read: no store
write) and `provision/token` (a device, its token and the replay record in
one transaction) at 128 in flight from one key (allowed 128 in flight), driven
by the C load driver (`bench/cmqtt.py`) so the driver is not what saturates;
without a C compiler the Python driver is used, and the figures say so. The C
echo (C driver -> C echo) is measured in the same run as the physical limit.
Phases are repeated (`rounds`) and interleaved; the best round counts.

On this 2-core machine the broker, the driver, PostgreSQL and the daemons
share the cores, which caps what more processes can add.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from bench import common
from bench.cmqtt import Unavailable, c_echo_process, c_load

CONCURRENCY = 128
OPERATIONS = (("keys/whoami", {}), ("provision/token", {"orgId": 1, "ownerId": 1}))


def _member(directory: Path, port: int, url: str, group: str, index: int) -> Path:
    """Daemon `index` of a phase: own state dir and client id, shared group and store."""
    directory.mkdir()
    # A fresh group per phase and no session kept: members of an earlier phase,
    # stopped, would otherwise keep (and hold back) a share of this one's requests.
    extra = (
        f'url = "{url}"\n[limits]\nmax_inflight_per_key = {CONCURRENCY}\n'
        f'[wifi]\nkeys_dir = "{directory / "signing_keys"}"\n'
    )
    config = common.write_config(directory, port, client_id=f"{group}-{index}", extra=extra)
    text = config.read_text().replace(
        "[mqtt]\n", f'[mqtt]\nshared_group = "{group}"\nsession_expiry_seconds = 0\n'
    )
    config.write_text(text)
    return config


async def _phase(
    d: Path, port: int, url: str, processes: int, name: str, driver: Any, n: int
) -> dict[str, Any]:
    key = common.seed_url(url)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for i in range(processes):
            config = _member(d / f"{name}-{i}", port, url, name, i)
            stack.enter_context(common.daemon_process(config, config.parent / "daemon.log"))
        await common.wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
        await asyncio.sleep(1.0)  # let every member subscribe
        for op, body in OPERATIONS:
            result = await driver(
                port, f"bench/rpc/{op}", body, key=key, n=n, concurrency=CONCURRENCY
            )
            out[op] = result.summary()
    return out


async def run(quick: bool = False, rounds: int = 2) -> dict[str, Any]:
    n = 2000 if quick else 10_000
    results: dict[str, Any] = {"requests": n, "concurrency": CONCURRENCY}
    with common.workdir() as d, common.mosquitto(d) as port, common.pg_cluster() as cluster:
        driver: Any = c_load
        try:
            with c_echo_process(port, "echo-c/rpc"):
                await common.wait_rpc_ready(port, "echo-c/rpc", None)
                limit = await c_load(port, "echo-c/rpc", {}, key=None, n=n, concurrency=CONCURRENCY)
            results["c_limit"] = limit.summary()
            results["driver"] = "C (bench/c/mqtt_load.c)"
        except Unavailable as exc:
            driver = common.rpc_load
            results["c_limit"] = f"skipped: {exc}"
            results["driver"] = "Python (aiomqtt): the C driver is unavailable"
        phases = [("sqlite", 1)] + (
            [("postgresql", k) for k in (1, 2, 3)] if cluster is not None else []
        )
        if cluster is None:
            results["postgresql"] = "skipped: no PostgreSQL package (initdb) on this machine"
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(rounds):
            for store, processes in phases:
                name = f"{store}{processes}r{round_}"
                url = (
                    cluster.new_database()
                    if store == "postgresql"
                    else f"sqlite:///{d / (name + '.db')}"
                )
                label = f"{store}, {processes} daemon{'s' if processes > 1 else ''}"
                runs.setdefault(label, []).append(
                    await _phase(d, port, url, processes, name, driver, n)
                )
        for label, measured in runs.items():
            results[label] = {
                op: max((r[op] for r in measured), key=lambda s: s["throughput_rps"])
                for op, _ in OPERATIONS
            }
        results["rounds"] = runs
        _ratios(results)
    return common.report("scale", results)


def _ratios(results: dict[str, Any]) -> None:
    """Each PostgreSQL figure's throughput as a multiple of 1 daemon on SQLite's."""
    base = results.get("sqlite, 1 daemon")
    if not isinstance(base, dict):
        return
    ratios: dict[str, dict[str, float]] = {}
    for label, figures in results.items():
        if label.startswith("postgresql") and isinstance(figures, dict):
            ratios[label] = {
                op: common.ratio(figures[op]["throughput_rps"], base[op]["throughput_rps"])
                for op, _ in OPERATIONS
            }
    results["vs_sqlite_1_daemon"] = ratios


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    main()
