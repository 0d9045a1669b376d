"""What every group of commands shares: the config `-c` names, the store, output."""

from __future__ import annotations

import argparse
import json
from typing import Any

import sqlite_utils

from provisiond.config import Config, config_path, load, resolve_path
from provisiond.schema import all_migrations
from provisiond.store import connect, migrate


def load_config(args: argparse.Namespace) -> Config:
    """The config file `-c` (or $PROVISIOND_CONFIG, or the default path) names."""
    return load(config_path(args.config))


def open_db(config: Config) -> sqlite_utils.Database:
    """The daemon's store, migrated, for a command that reads or writes it directly."""
    db = connect(resolve_path(config, config.store.path), synchronous=config.store.synchronous)
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
