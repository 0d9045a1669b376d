"""`python -m bench all [--quick]` or `python -m bench NAME [--quick]`.

Each benchmark starts its own mosquitto, measures the project's figure and a
baseline in the same run, and prints both with their ratio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from typing import Any

BENCHES = [
    "rpc", "grant", "presence", "startup", "scale", "ble_upload", "fairness",
    "broker_accounts", "group_commit", "presence_cluster",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=["all", *BENCHES])
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts (about a minute in all)"
    )
    args = parser.parse_args()
    names = BENCHES if args.name == "all" else [args.name]
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"skipping {name}: {exc}")
            continue
        results[name] = module.main(quick=args.quick)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
