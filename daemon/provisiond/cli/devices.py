"""`provisiond devices list|show` and `provisiond tokens revoke`: operator views of the store.

These work on the database file directly (the daemon may be running: SQLite
WAL lets both read, and a revocation is one short BEGIN IMMEDIATE
transaction). They print JSON, never a token or its hash.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import sqlite_utils

from provisiond import tokens
from provisiond.cli.common import command_group, load_config, number_argument, open_db, print_json
from provisiond.devices import device_view, find_device, list_devices
from provisiond.errors import NotFound
from provisiond.store import transaction

EXIT_OK = 0


def _open(args: argparse.Namespace) -> sqlite_utils.Database:
    return open_db(load_config(args))


def _require_device(db: sqlite_utils.Database, device_id: int) -> None:
    if find_device(db, device_id) is None:
        raise NotFound(f"no device with id {device_id}")


def cmd_devices_list(args: argparse.Namespace) -> int:
    db = _open(args)
    devices = list_devices(db, org_id=args.org, owner_id=args.owner)
    print_json([device_view(d) for d in devices if args.state is None or d.state == args.state])
    return EXIT_OK


def cmd_devices_show(args: argparse.Namespace) -> int:
    db = _open(args)
    device = find_device(db, args.id)
    if device is None:
        raise NotFound(f"no device with id {args.id}")
    now = time.time()
    view: dict[str, Any] = device_view(device)
    view["has_public_key"] = device.public_key is not None
    view["tokens"] = tokens.history(db, device.id, now=now)
    print_json(view)
    return EXIT_OK


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    db = _open(args)
    with transaction(db):
        _require_device(db, args.device_id)
        count = tokens.revoke_unused(db, args.device_id, now=time.time())
    # Nothing to revoke is not an error: the outcome the operator wants holds.
    print(f"{count} unused token(s) of device {args.device_id} revoked")
    return EXIT_OK


_positive_int = number_argument(int, "positive", lambda value: value > 0)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the `devices` and `tokens` command groups on the main parser."""
    devices = command_group(sub, common, "devices", "inspect devices")
    p = devices.add_parser("list", parents=[common], help="list devices as JSON")
    p.add_argument("--org", type=_positive_int, help="only this organisation's devices")
    p.add_argument("--owner", type=_positive_int, help="only this user's devices")
    p.add_argument(
        "--state",
        choices=["pending", "active", "decommissioned"],
        help="only devices in this state",
    )
    p.set_defaults(fn=cmd_devices_list)
    p = devices.add_parser(
        "show", parents=[common], help="one device with its token history (never the tokens)"
    )
    p.add_argument("id", type=_positive_int, metavar="ID")
    p.set_defaults(fn=cmd_devices_show)

    toks = command_group(sub, common, "tokens", "manage provision tokens")
    p = toks.add_parser(
        "revoke", parents=[common], help="revoke every unused provision token of a device"
    )
    p.add_argument("device_id", type=_positive_int, metavar="DEVICE_ID")
    p.set_defaults(fn=cmd_tokens_revoke)
