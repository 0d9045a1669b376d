"""`provisiond devices decommission ID` and `provisiond broker-accounts sync [--apply]`.

`devices decommission` asks the running daemon (`P/rpc/device/decommission`)
with an operator API key, like `status`: only the daemon can drop the device
from its in-memory presence and command delivery, so the shell does not go
around it. `broker-accounts sync` needs no daemon: it reads the store file and
talks to the broker's dynamic-security plugin on the daemon's own account.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from provisiond.broker_accounts import BrokerAccountsUnavailable, make_backend
from provisiond.broker_accounts.sync import sync
from provisiond.cli.common import EXIT_OK, fail, open_db
from provisiond.cli.ops import OperatorError, ask_with_key
from provisiond.config import ENV_KEY, config_path, load

DEFAULT_TIMEOUT = 10.0


def cmd_devices_decommission(args: argparse.Namespace) -> int:
    body = {"deviceId": args.id}
    try:
        ask_with_key(args, "decommission", "provision:write", "device/decommission", body)
    except OperatorError as exc:
        return fail(str(exc))
    print(f"device {args.id} decommissioned")
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from provisiond.clock import Clock

    config = load(config_path(args.config))
    if config.broker_accounts.backend == "none":
        return fail('broker_accounts.backend is "none": accounts are managed elsewhere')
    db = open_db(config)

    async def store_call(fn: Any) -> Any:
        # The CLI's own connection; one short read and at most one short write.
        return fn(db)

    async def run() -> dict[str, Any]:
        accounts = make_backend(config, name=f"accounts-cli-{uuid.uuid4().hex[:8]}")
        try:
            result = await sync(
                accounts,
                store_call,
                prefix=config.broker_accounts.username_prefix,
                now=Clock().now(),
                apply=args.apply,
            )
        finally:
            await accounts.close()
        return result.summary()

    try:
        summary = asyncio.run(run())
    except BrokerAccountsUnavailable as exc:
        return fail(exc.message)
    finally:
        db.conn.close()
    print(json.dumps(summary, indent=2, sort_keys=True))
    if not args.apply and (
        summary["delete_clients"] or summary["delete_roles"] or summary["create"]
    ):
        print("dry run: nothing changed; run again with --apply to fix", file=sys.stderr)
    return EXIT_OK


def cmd_init_dynsec(args: argparse.Namespace) -> int:
    from provisiond.broker_accounts.bootstrap import BootstrapError, init_dynsec

    passwords: dict[str, str] = {}
    for item in args.password or ():
        username, sep, path = item.partition("=")
        if not sep or not username or not path:
            return fail(f"--password wants USERNAME=FILE, not {item!r}")
        try:
            passwords[username] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            return fail(f"cannot read the password file of {username}: {exc.strerror}")
    try:
        names = init_dynsec(Path(args.template), Path(args.out), passwords)
    except (BootstrapError, OSError, ValueError) as exc:
        return fail(str(exc))
    print(f"{args.out} written; passwords set for: {', '.join(names) or '(none)'}")
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    devices = next(
        action
        for action in sub.choices["devices"]._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    p = devices.add_parser(
        "decommission",
        parents=[common],
        help="take a device out of service (asks the running daemon; needs provision:write)",
    )
    p.add_argument("id", type=_positive_int, metavar="ID")
    p.add_argument("--key", help=f"API key with scope provision:write (default ${ENV_KEY})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    p.set_defaults(fn=cmd_devices_decommission)

    accounts = sub.add_parser(
        "broker-accounts", parents=[common], help="devices' broker accounts"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = accounts.add_parser(
        "sync",
        parents=[common],
        help="compare the broker's device accounts with the store; fix with --apply",
    )
    p.add_argument("--apply", action="store_true", help="make the changes (default: dry run)")
    p.set_defaults(fn=cmd_sync)
    p = accounts.add_parser(
        "init-dynsec",
        parents=[common],
        help="write mosquitto's first dynamic-security file from the shipped template",
    )
    p.add_argument("template", help="config/mosquitto/dynamic-security.json")
    p.add_argument("out", help="the plugin's plugin_opt_config_file (written 0600)")
    p.add_argument(
        "--password",
        action="append",
        metavar="USERNAME=FILE",
        help="set this account's password from the file (repeatable)",
    )
    p.set_defaults(fn=cmd_init_dynsec)
