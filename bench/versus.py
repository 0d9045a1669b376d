"""The same RPC load against this tree's daemon and an earlier commit's, same run.

python -m bench.versus --base REV [--quick]

The earlier tree comes from `git archive REV` into a temp dir; both daemons
run from the same venv (PYTHONPATH picks the tree), on fresh SQLite stores,
one after the other, the pair repeated (interleaved) so machine drift hits
both. Figures: `keys/whoami` and `provision/token` with bench rpc's settings
(32 in flight, a per-key bound of 16), and `provision/token` with
128 in flight allowed to one key (where writes can batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
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

LOADS = [
    ("keys/whoami", {}, 32, 16),
    ("provision/token", {"orgId": 1, "ownerId": 1}, 32, 16),
    ("provision/token", {"orgId": 1, "ownerId": 1}, 128, 128),
]


@contextlib.contextmanager
def tree(rev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="provisiond-versus-") as d:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", d], input=archive, check=True)
        yield Path(d)


def daemon(code: Path, config: Path, log: Path) -> contextlib.AbstractContextManager[object]:
    return daemon_process(config, log, code=code)


async def run(base: str, quick: bool = False, rounds: int = 2) -> dict[str, Any]:
    n = 2000 if quick else 8000
    figures: dict[str, dict[str, list[float]]] = {}
    with workdir() as d, mosquitto(d) as port, tree(base) as old:
        for round_ in range(rounds):
            for label, code in (("base", old), ("head", ROOT)):
                for i, (op, body, concurrency, per_key) in enumerate(LOADS):
                    sub = d / f"{label}-{round_}-{i}"
                    sub.mkdir()
                    key = seed(sub)
                    config = write_config(
                        sub, port, client_id=f"vs-{sub.name}",
                        extra=f"[limits]\nmax_inflight_per_key = {per_key}\n",
                    )  # fmt: skip
                    with daemon(code, config, sub / "daemon.log"):
                        await wait_rpc_ready(port, "bench/rpc/keys/whoami", key)
                        result = await rpc_load(
                            port, f"bench/rpc/{op}", body, key=key, n=n, concurrency=concurrency
                        )
                    name = f"{op} @{concurrency}"
                    figures.setdefault(name, {"base": [], "head": []})[label].append(
                        result.throughput
                    )
    out: dict[str, Any] = {"base": base}
    for name, sides in figures.items():
        best = {side: max(values) for side, values in sides.items()}
        out[name] = {
            "base_rps": [round(v, 1) for v in sides["base"]],
            "head_rps": [round(v, 1) for v in sides["head"]],
            "head_vs_base": ratio(best["head"], best["base"]),
        }
    return report("versus", out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__)
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.base, args.quick))))


if __name__ == "__main__":
    main()
