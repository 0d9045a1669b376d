"""The `provisiond` command: run the daemon and administer its store.

Every subcommand takes `-c FILE` (default `$PROVISIOND_CONFIG`, then
/etc/provisiond/provisiond.toml). A bad config exits 3 — systemd's
`RestartPreventExitStatus=3` then stops restarting a daemon that cannot work.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from provisiond import __version__, auth, logs, plugins
from provisiond.cli import broker_accounts as cli_broker_accounts
from provisiond.cli import call as cli_call
from provisiond.cli import db as cli_db
from provisiond.cli import devices as cli_devices
from provisiond.cli import ops as cli_ops
from provisiond.cli.common import load_config, open_db, print_json
from provisiond.config import EXIT_BAD_CONFIG, config_path, load
from provisiond.errors import ConfigError, RpcError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]
# Modules add subcommand groups here: fn(subparsers, parent_parser).
EXTRA_COMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    cli_devices.add_commands,
    cli_ops.add_commands,
    cli_call.add_commands,
    cli_broker_accounts.add_commands,
    cli_db.add_commands,  # after cli_ops, which makes the `db` group
]


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    logs.setup(config.log)
    from provisiond.server import Server
    from provisiond.systemd import make_notifier, watchdog_interval

    async def main() -> None:
        server = Server(
            config,
            notify=make_notifier(),
            watchdog_interval=watchdog_interval(),
            setup_logging=logs.setup,
            freeze_heap=True,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        # The same file (and environment) as at start, read again.
        loop.add_signal_handler(signal.SIGHUP, server.request_reload, lambda: load_config(args))
        await server.serve()

    asyncio.run(main())
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    config = load(path)
    # Plugin tables are judged by their plugins' own schemas, as at start.
    plugins.resolve(config)
    if path.is_file():
        print(f"config ok: {path}")
    else:
        # Only the default path may be missing (load() refuses any other).
        print(f"config ok: no file at {path}; defaults and environment only")
    return EXIT_OK


def cmd_orgs_create(args: argparse.Namespace) -> int:
    auth.create_org(open_db(load_config(args)), args.id, args.name)
    print(f"organisation {args.id} created")
    return EXIT_OK


def cmd_users_create(args: argparse.Namespace) -> int:
    auth.create_user(open_db(load_config(args)), args.org, args.id)
    print(f"user {args.id} created in organisation {args.org}")
    return EXIT_OK


def cmd_keys_create(args: argparse.Namespace) -> int:
    key_id, secret = auth.create_key(
        open_db(load_config(args)),
        org_id=args.org,
        user_id=args.user,
        scopes=frozenset(args.scope or ()),
        permissions=frozenset(args.permission or ()),
    )
    print(f"key {key_id} created; it is shown once, store it now:")
    print(secret)
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    print_json(auth.list_keys(open_db(load_config(args))))
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    auth.revoke_key(open_db(load_config(args)), args.id)
    print(f"key {args.id} revoked")
    return EXIT_OK


CONFIG_HELP = "config file (default: $PROVISIOND_CONFIG or /etc/provisiond/provisiond.toml)"


def _config_option(default: object) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-c", "--config", metavar="FILE", default=default, help=CONFIG_HELP)
    return parent


def build_parser() -> argparse.ArgumentParser:
    # `-c` is accepted before and after the command. A subparser writes its
    # defaults over the namespace the top-level parser filled, so the copy the
    # subcommands get must have no default at all (SUPPRESS): otherwise
    # `provisiond -c FILE keys list` would end with config=None.
    parser = argparse.ArgumentParser(
        prog="provisiond",
        description="Provisioning and WiFi-grant daemon for MQTT gateways.",
        parents=[_config_option(None)],
    )
    common = _config_option(argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"provisiond {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the daemon").set_defaults(fn=cmd_run)
    sub.add_parser(
        "check-config", parents=[common], help="validate the config and exit"
    ).set_defaults(fn=cmd_check_config)

    orgs = sub.add_parser("orgs", parents=[common], help="manage organisations").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = orgs.add_parser("create", parents=[common], help="create an organisation")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--name", default="")
    p.set_defaults(fn=cmd_orgs_create)

    users = sub.add_parser("users", parents=[common], help="manage users").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = users.add_parser("create", parents=[common], help="create a user in an organisation")
    p.add_argument("--org", type=int, required=True)
    p.add_argument("--id", type=int, required=True)
    p.set_defaults(fn=cmd_users_create)

    keys = sub.add_parser("keys", parents=[common], help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = keys.add_parser(
        "create",
        parents=[common],
        help="create an API key (printed once, alone on the last line)",
        description=f"Scopes: {', '.join(sorted(auth.SCOPES))}. "
        f"Permissions (user-scoped keys): {', '.join(sorted(auth.PERMISSIONS))}.",
    )
    p.add_argument("--org", type=int, required=True)
    p.add_argument("--user", type=int, help="make a user-scoped key acting as this user")
    p.add_argument("--scope", action="append", choices=sorted(auth.SCOPES))
    p.add_argument("--permission", action="append", choices=sorted(auth.PERMISSIONS))
    p.set_defaults(fn=cmd_keys_create)
    keys.add_parser("list", parents=[common], help="list keys (never their secrets)").set_defaults(
        fn=cmd_keys_list
    )
    p = keys.add_parser("revoke", parents=[common], help="revoke a key by id")
    p.add_argument("id")
    p.set_defaults(fn=cmd_keys_revoke)

    for add in EXTRA_COMMANDS:
        add(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Command = args.fn
    try:
        return fn(args)
    except ConfigError as exc:
        print(f"provisiond: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except RpcError as exc:
        print(f"provisiond: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
