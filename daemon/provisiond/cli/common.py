"""What every group of commands shares: the config `-c` names, the store, output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import sqlite_utils

from provisiond.config import Config, config_path, load
from provisiond.errors import StoreUnavailable
from provisiond.schema import all_migrations
from provisiond.store import is_postgresql, migrate, open_database, store_target

N = TypeVar("N", int, float)

EXIT_OK = 0
EXIT_FAILURE = 1


def fail(message: str) -> int:
    """Print what the operator must fix as one line; the failure exit status."""
    print(f"provisiond: {message}", file=sys.stderr)
    return EXIT_FAILURE


def load_config(args: argparse.Namespace) -> Config:
    """The config file `-c` (or $PROVISIOND_CONFIG, or the default path) names."""
    return load(config_path(args.config))


def open_db(config: Config) -> sqlite_utils.Database:
    """The daemon's store, migrated, for a command that reads or writes it directly:
    the SQLite file or the PostgreSQL database `[store] url` names, as the daemon opens it."""
    target, password = store_target(config)
    if is_postgresql(target):
        import psycopg  # there whenever a PostgreSQL store loads (config.py checks)

        try:
            db = open_database(target, password=password)
        except psycopg.OperationalError as exc:
            # A server that is down or refuses us: one line, not a traceback
            # (psycopg's first line names host, port and reason, never a password).
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreUnavailable(f"cannot open the store: {reason}") from None
    else:
        db = open_database(target, synchronous=config.store.synchronous)
    migrate(db, all_migrations())
    return db


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def command_group(
    sub: Any, common: argparse.ArgumentParser, name: str, summary: str
) -> argparse._SubParsersAction[Any]:
    """A command such as `db` whose ACTIONs (`db backup`) the caller adds."""
    group: argparse._SubParsersAction[Any] = sub.add_parser(
        name, parents=[common], help=summary
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    return group


def number_argument(kind: type[N], rule: str, accept: Callable[[N], bool]) -> Callable[[str], N]:
    """An argparse `type`: the `kind` number in the text, refused unless `accept`-ed
    (the message says it `must be {rule}`)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not accept(value):
            # A float is echoed as typed ("0", not "0.0"), an integer as read.
            shown = value if kind is int else text
            raise argparse.ArgumentTypeError(f"must be {rule}: {shown}")
        return value

    return parse
