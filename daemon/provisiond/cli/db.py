"""`provisiond db migrate` and `provisiond db copy SRC_URL DST_URL`.

`db copy` moves a gateway's data (SQLite) to a cluster (PostgreSQL), or any
store to any other: it migrates the target, refuses a target that already
holds rows, copies every table in one transaction, then checks the copy with
row counts and a sample of rows compared column by column.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import sqlite_utils

from provisiond.cli.common import EXIT_FAILURE, EXIT_OK, fail, load_config
from provisiond.cli.ops import OperatorError, _subcommands
from provisiond.schema import all_migrations
from provisiond.store import (
    copy_finished,
    is_postgresql,
    migrate,
    open_database,
    store_target,
    table_columns,
    table_names,
    transaction,
)

# Parents before children (foreign keys); tables not listed follow, by name.
TABLE_ORDER = [
    "orgs",
    "users",
    "api_keys",
    "devices",
    "provision_tokens",
    "replays",
    "consumed_grants",
    "presence",
    "commands",
]
SAMPLE_ROWS = 50
BATCH = 1000


def cmd_db_migrate(args: argparse.Namespace) -> int:
    config = load_config(args)
    target, password = store_target(config)
    db = open_database(target, synchronous=config.store.synchronous, password=password)
    try:
        applied = migrate(db, all_migrations())
    finally:
        db.conn.close()
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return EXIT_OK


def _open(url: str, password_file: str | None) -> sqlite_utils.Database:
    password = None
    if password_file:
        password = Path(password_file).read_text().strip()
    if not is_postgresql(url) and not url.startswith("sqlite:///"):
        raise OperatorError(f"{url!r}: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return open_database(url, password=password)


def cmd_db_copy(args: argparse.Namespace) -> int:
    try:
        if not is_postgresql(args.src) and not Path(args.src.removeprefix("sqlite://")).is_file():
            raise OperatorError(f"no database at {args.src}")
        src = _open(args.src, args.src_password_file)
        dst = _open(args.dst, args.dst_password_file)
        try:
            counts = copy_store(src, dst)
        finally:
            src.conn.close()
            dst.conn.close()
    except OperatorError as exc:
        return fail(str(exc))
    total = sum(counts.values())
    detail = ", ".join(f"{t} {n}" for t, n in counts.items())
    print(f"copied {total} rows ({detail}); counts and a sample of rows match")
    return EXIT_OK


def copy_store(src: sqlite_utils.Database, dst: sqlite_utils.Database) -> dict[str, int]:
    """Copy every table of `src` into the empty, migrated `dst`; check and return the counts."""
    migrate(src, all_migrations())
    migrate(dst, all_migrations())
    present = set(table_names(src)) - {"schema_migrations"}
    tables = [t for t in TABLE_ORDER if t in present] + sorted(present - set(TABLE_ORDER))
    for table in tables:
        if dst.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():  # noqa: S608 - table names from the schema
            raise OperatorError(
                f"the target already holds rows in {table}; copy into an empty store"
            )
    counts: dict[str, int] = {}
    with transaction(dst):
        for table in tables:
            columns = table_columns(src, table)
            names = ", ".join(columns)
            marks = ", ".join("?" for _ in columns)
            insert = f"INSERT INTO {table} ({names}) VALUES ({marks})"  # noqa: S608
            rows = src.execute(f"SELECT {names} FROM {table}").fetchall()  # noqa: S608
            for start in range(0, len(rows), BATCH):
                dst.conn.executemany(insert, [tuple(r) for r in rows[start : start + BATCH]])
            counts[table] = len(rows)
        copy_finished(dst, tables)
    _check(src, dst, tables, counts)
    return counts


def _check(
    src: sqlite_utils.Database,
    dst: sqlite_utils.Database,
    tables: list[str],
    counts: dict[str, int],
) -> None:
    for table in tables:
        copied = int(dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608
        if copied != counts[table]:
            raise OperatorError(f"{table}: {counts[table]} rows in the source, {copied} copied")
        columns = table_columns(src, table)
        key = columns[0]
        ids = [r[0] for r in src.execute(f"SELECT {key} FROM {table}").fetchall()]  # noqa: S608
        for value in random.sample(ids, min(SAMPLE_ROWS, len(ids))):
            query = f"SELECT {', '.join(columns)} FROM {table} WHERE {key} = ?"  # noqa: S608
            a = _normal(src.execute(query, [value]).fetchone())
            b = _normal(dst.execute(query, [value]).fetchone())
            if a != b:
                raise OperatorError(f"{table}: the row with {key} = {value!r} differs in the copy")


def _normal(row: Any) -> tuple[Any, ...] | None:
    return None if row is None else tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `migrate` and `copy` to the `db` group (cli_ops makes the group)."""
    db = _subcommands(sub.choices["db"])
    p = db.add_parser("migrate", parents=[common], help="apply the schema migrations to the store")
    p.set_defaults(fn=cmd_db_migrate)
    p = db.add_parser(
        "copy",
        parents=[common],
        help="copy every row from SRC_URL to the empty store DST_URL, then check it",
    )
    p.add_argument(
        "src", metavar="SRC_URL", help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
    )
    p.add_argument("dst", metavar="DST_URL")
    p.add_argument("--src-password-file", help="file holding the source's PostgreSQL password")
    p.add_argument("--dst-password-file", help="file holding the target's PostgreSQL password")
    p.set_defaults(fn=cmd_db_copy)


__all__ = ["EXIT_FAILURE", "add_commands", "copy_store"]
