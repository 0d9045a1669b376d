"""Start-to-ready with 100k devices in the store vs an empty store.

    python -m bench startup [--quick]

Time from spawning `provisiond run` to its first answered request. The
baseline is the same daemon on an empty store, measured in the same run, so
the ratio is what the fleet costs at start (loading presence, the active set).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ENV, mosquitto, ratio, report, seed, wait_rpc_ready, workdir, write_config


def add_devices(db_path: Path, n: int) -> None:
    db = sqlite3.connect(db_path)
    now = time.time()
    db.executemany(
        "INSERT INTO devices (org_id, owner_id, state, capabilities, public_key, created_at, activated_at)"
        " VALUES (1, 1, 'active', 2, ?, ?, ?)",
        ((os.urandom(32), now, now) for _ in range(n)),
    )
    db.commit()
    db.close()


async def time_to_ready(directory: Path, port: int, key: str) -> float:
    config = write_config(directory, port, client_id=f"startup-{directory.name}")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisiond", "run", "-c", str(config)],
        env=ENV, stdout=(directory / "daemon.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await wait_rpc_ready(port, "bench/rpc/keys/whoami", key, timeout=120, poll=0.05)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)


async def run(quick: bool = False) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    with workdir() as root, mosquitto(root) as port:
        empty, full = root / "empty", root / "full"
        empty.mkdir()
        full.mkdir()
        key_empty = seed(empty)
        key_full = seed(full)
        add_devices(full / "provisiond.db", n)
        # First starts create signing keys and warm the page cache; measure the second.
        await time_to_ready(empty, port, key_empty)
        await time_to_ready(full, port, key_full)
        baseline = await time_to_ready(empty, port, key_empty)
        loaded = await time_to_ready(full, port, key_full)
    return report(
        "startup",
        {
            "devices": n,
            "empty_store_seconds": round(baseline, 3),
            "seconds": round(loaded, 3),
            "ratio_vs_empty": ratio(loaded, baseline),
        },
    )


def main(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(run(quick))


if __name__ == "__main__":
    main()
