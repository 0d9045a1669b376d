"""Operator commands: `status`, `db backup`, `keys rotate-signing`, `keys reseal`.

`status` asks the running daemon over MQTT, with the daemon's own broker
settings and an API key given by the operator (this command creates nothing).
The others work beside the running daemon: SQLite's online backup, the WiFi
signing key ring (files on SQLite, the store's ring on PostgreSQL), and the
sealing of the store's private keys under a new key-encryption key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from provisiond.cli.common import EXIT_OK, command_group, fail, load_config, open_db
from provisiond.clock import iso_utc
from provisiond.config import ENV_KEY, Config, resolve_path

DEFAULT_STATUS_TIMEOUT = 5.0


T = TypeVar("T")


class OperatorError(Exception):
    """Something the operator must fix; printed as one line, exit 1."""


# --- status


def cmd_status(args: argparse.Namespace) -> int:
    try:
        body = ask_with_key(args, "status", "daemon:read", "daemon/stats", {})
    except OperatorError as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        print(format_status(body))
    return EXIT_OK


def ask_with_key(
    args: argparse.Namespace, what: str, scope: str, operation: str, body: dict[str, Any]
) -> dict[str, Any]:
    """The body of the daemon's 200 reply to one request made with the operator's
    API key (`--key` or $PROVISIOND_KEY); `OperatorError` for anything else."""
    key = args.key or os.environ.get(ENV_KEY, "")
    if not key:
        raise OperatorError(f"{what} needs an API key with scope {scope}: --key or ${ENV_KEY}")
    config = load_config(args)
    reply = asyncio.run(ask_daemon(config, key, operation, body, args.timeout))
    if reply.get("status") != 200:
        error = reply.get("error") or {}
        raise OperatorError(
            f"the daemon answered {reply.get('status')} {error.get('code', '')}: "
            f"{error.get('message', '')}"
        )
    answer: dict[str, Any] = reply.get("body") or {}
    return answer


async def ask_daemon(
    config: Config, key: str, operation: str, body: dict[str, Any], wait_seconds: float
) -> dict[str, Any]:
    """One request to the running daemon as a short-lived MQTT v5 client; the reply envelope.

    Through the daemon's own transport boundary and native client: the same
    credentials and TLS settings as the daemon, read the same way, and no
    aiomqtt or paho needed.
    """
    from provisiond.transport import (
        TransportError,
        connect_options,
        load_backend,
        rpc_request,
    )

    timeout = wait_seconds
    mqtt = config.mqtt
    prefix = mqtt.topic_prefix
    tag = uuid.uuid4().hex[:12]
    reply_topic = f"{prefix}/replies/cli-{tag}"
    where = f"{mqtt.host}:{mqtt.port}"
    options = await connect_options(
        config,
        # Never the daemon's own client id: the broker would disconnect the daemon.
        client_id=f"{mqtt.client_id}-cli-{tag}",
        clean_start=True,
        connect_timeout=timeout,
    )
    conn = load_backend("native").connection(options, 1)
    try:
        await conn.connect()
    except TransportError as exc:
        raise OperatorError(f"cannot talk to the broker at {where}: {exc}") from None
    try:
        reply = await rpc_request(
            conn,
            prefix,
            operation,
            body,
            key=key,
            reply_topic=reply_topic,
            wait_seconds=timeout,
            # If the daemon is down, its persistent session would keep the request;
            # let the broker drop it once nobody waits for the answer.
            message_expiry=max(1, math.ceil(timeout)),
        )
        if reply is not None:
            return reply
    except TimeoutError:
        raise OperatorError(
            f"no reply from the daemon within {timeout:g}s on {prefix}/rpc/{operation} "
            f"via {where}; is it running (systemctl status provisiond)?"
        ) from None
    except TransportError as exc:
        raise OperatorError(f"cannot talk to the broker at {where}: {exc}") from None
    finally:
        await conn.disconnect()
    raise OperatorError(f"the connection to {where} closed before the daemon replied")


def format_status(body: dict[str, Any]) -> str:
    """The stats reply as a few lines for a person."""
    counters: dict[str, int] = body.get("counters") or {}
    lines = [
        f"provisiond {body.get('version', '?')}: up {_duration(body.get('uptime_seconds', 0))}, "
        f"broker {'connected' if body.get('connected') else 'DISCONNECTED'} "
        f"(connections since start: {body.get('connections', 0)})",
    ]
    by_status = {
        name.rsplit(".", 1)[1]: n for name, n in counters.items() if name.startswith("rpc.status.")
    }
    detail = ", ".join(f"{code}: {by_status[code]}" for code in sorted(by_status))
    lines.append(
        f"requests: {counters.get('rpc.requests', 0)}"
        + (f" ({detail})" if detail else "")
        + f", in flight {body.get('inflight', 0)}"
    )
    heartbeats = {
        name: n for name, n in counters.items() if "heartbeat" in name and not isinstance(n, dict)
    }
    if heartbeats:
        lines.append("heartbeats: " + ", ".join(f"{k} {v}" for k, v in sorted(heartbeats.items())))
    presence = _presence(body)
    if presence is not None:
        lines.append(f"devices: {presence['online']} online, {presence['offline']} offline")
    return "\n".join(lines)


def _presence(body: dict[str, Any]) -> dict[str, Any] | None:
    # Whichever stats probe reports device counts (the presence feature's, today).
    candidates = [body.get("presence"), *body.values()]
    for value in candidates:
        if isinstance(value, dict) and {"online", "offline"} <= value.keys():
            return value
    return None


def _duration(seconds: float) -> str:
    total = int(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


# --- db backup


def cmd_db_backup(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config.store.url.startswith(("postgresql://", "postgres://")):
        return fail("db backup copies a SQLite file; back PostgreSQL up with pg_dump")
    source = resolve_path(config, config.store.path)
    try:
        pages = backup_database(source, Path(args.path), overwrite=args.force)
    except OperatorError as exc:
        return fail(str(exc))
    print(f"backed up {source} to {args.path} ({pages} pages, integrity ok)")
    return EXIT_OK


def backup_database(source: Path, target: Path, *, overwrite: bool = False) -> int:
    """Copy a live SQLite database with the online backup API; returns its page count.

    The copy is one consistent snapshot even while the daemon writes (WAL
    readers do not block the writer). It is written beside `target` and
    renamed into place only after an integrity check, so `target` is never a
    half-written file. The copy holds key hashes and sealed replies: mode 0600.
    """
    if not source.is_file():
        raise OperatorError(f"no database at {source} (store.path)")
    if target.exists() and not overwrite:
        raise OperatorError(f"{target} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise OperatorError(f"directory {target.parent} does not exist")
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        # mode=rw: never create an empty database where the real one is missing.
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
                # A self-contained file: no -wal/-shm companions needed to open it.
                dst.execute("PRAGMA journal_mode=DELETE")
                check = dst.execute("PRAGMA integrity_check").fetchone()
                if check is None or check[0] != "ok":
                    raise OperatorError(f"the copy failed its integrity check: {check}")
                pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
            finally:
                dst.close()
        finally:
            src.close()
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    except sqlite3.Error as exc:
        raise OperatorError(f"backup failed: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return pages


# --- keys rotate-signing


def cmd_keys_rotate_signing(args: argparse.Namespace) -> int:
    from provisiond.keyvault import keys_in_store

    config = load_config(args)
    try:
        if keys_in_store(config):
            return _rotate_in_store(config, time.time())
        new_kid, retired = rotate_signing(config, time.time())
    except OperatorError as exc:
        return fail(str(exc))
    print(f"new signing key {new_kid} is active on disk")
    for kid, until in retired:
        print(f"key {kid} now only verifies, until {iso_utc(until)}")
    # The running daemon holds the ring in memory and reloads it on SIGHUP.
    print("reload the daemon so it signs with the new key: systemctl reload provisiond")
    return EXIT_OK


def _daemon_managed(config: Config) -> None:
    """Refuse keys the daemon does not manage (HS256, operator files)."""
    wifi = config.wifi
    if wifi.signing_algorithm == "HS256":
        raise OperatorError(
            "signing_algorithm is HS256: grants are keyed per device from the master "
            "secret; replace wifi.hs256_master_secret_file to change it"
        )
    if wifi.signing_key_files:
        raise OperatorError(
            "signing keys come from wifi.signing_key_files (operator-managed): put the new "
            "key first in that list and keep the old one after it for an hour"
        )


def _rotate_in_store(config: Config, now: float) -> int:
    """Rotate the ring every daemon on the PostgreSQL store shares; no reload needed."""
    from provisiond.keyvault import load_kek
    from provisiond.wifi import keystore

    _daemon_managed(config)
    # A config error (no KEK, another KEK than the daemons') exits 3 in main.
    kek = load_kek(config, why="the grant signing keys live in the store")
    propagation = config.wifi.key_propagation_seconds
    rotation = _in_store_transaction(
        config,
        lambda db: keystore.rotate(
            db, kek, now=now, propagation=propagation, alg=config.wifi.signing_algorithm
        ),
    )
    print(
        f"new signing key {rotation.kid} is published by every daemon within "
        f"{keystore.refresh_interval(propagation):g} s and signs from "
        f"{iso_utc(rotation.sign_from)}; no reload needed"
    )
    for kid, until in rotation.retiring:
        print(f"key {kid} now only verifies, until {iso_utc(until)}")
    return EXIT_OK


def _in_store_transaction(config: Config, fn: Callable[[sqlite_utils.Database], T]) -> T:
    """`fn(db)` in one transaction on the store the config names.

    A server that cannot be reached is one line and exit 1 (`open_db`, in
    main); one lost during the transaction is an `OperatorError`.
    """
    import psycopg

    from provisiond.store import transaction

    db = open_db(config)
    try:
        with transaction(db):
            return fn(db)
    except psycopg.OperationalError as exc:
        raise OperatorError(f"cannot use the store: {type(exc).__name__}") from None
    finally:
        db.conn.close()


# --- keys reseal


def cmd_keys_reseal(args: argparse.Namespace) -> int:
    """Seal every private key in the store under the current KEK (the KEK's rotation)."""
    from provisiond.broker_accounts.certificates import reseal_ca
    from provisiond.keyvault import PREVIOUS_KEK_KEY, keys_in_store, load_kek
    from provisiond.wifi import keystore

    config = load_config(args)
    if not keys_in_store(config):
        return fail("the store is SQLite: its keys are files in the state directory, not sealed")
    # A config error (no KEK; a row under neither the current nor the previous
    # KEK) exits 3 in main, and nothing is written: one transaction.
    kek = load_kek(config, why="the private keys live in the store")
    try:
        keys, ca = _in_store_transaction(
            config, lambda db: (keystore.reseal(db, kek), reseal_ca(db, kek))
        )
    except OperatorError as exc:
        return fail(str(exc))
    moved = f"{keys} signing key(s)" + (" and the device CA key" if ca else "")
    print(f"resealed {moved} under key-encryption key {kek.id}; every key in the store is now")
    print(f"sealed under it: remove {PREVIOUS_KEK_KEY} from every host's config")
    return EXIT_OK


def rotate_signing(config: Config, now: float) -> tuple[str, list[tuple[str, float]]]:
    """Rotate the daemon-managed key ring; returns the new kid and the retired (kid, until)."""
    from provisiond.wifi.crypto import MAX_GRANT_LIFETIME
    from provisiond.wifi.service import keys_directory
    from provisiond.wifi.signing import KeyRing, KeyRingError

    _daemon_managed(config)
    directory = keys_directory(config)
    _require_owner(directory)
    try:
        ring = KeyRing.load_or_create(directory, config.wifi.signing_algorithm, now=now)
        new = ring.rotate(now, max_grant_lifetime=MAX_GRANT_LIFETIME)
    except (KeyRingError, OSError) as exc:
        raise OperatorError(f"cannot rotate the keys in {directory}: {exc}") from None
    retired = [
        (k.kid, k.verify_until)
        for k in ring.keys
        if k.kid != new.kid and k.verify_until is not None
    ]
    return new.kid, retired


def _require_owner(directory: Path) -> None:
    # Files made by another user (typically root) would be unreadable to the
    # daemon's user, and the next start would fail on a key it cannot open.
    if directory.exists() and directory.stat().st_uid != os.geteuid():
        owner = directory.stat().st_uid
        raise OperatorError(
            f"{directory} belongs to uid {owner}; run this as that user "
            f"(e.g. sudo -u provisiond provisiond keys rotate-signing)"
        )


# --- registration


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    # argparse offers no public way back to a group's subparsers; cli.py made `keys`.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no subcommands")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `status`, `db backup`, `keys rotate-signing` and `keys reseal`."""
    p = sub.add_parser(
        "status",
        parents=[common],
        help="ask the running daemon over MQTT: uptime, connection, counters, devices",
    )
    p.add_argument(
        "--key",
        help=f"API key with scope daemon:read (default ${ENV_KEY}; prefer the variable, "
        "command lines are visible to other users)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_STATUS_TIMEOUT,
        help=f"seconds to wait for the reply (default {DEFAULT_STATUS_TIMEOUT:g})",
    )
    p.add_argument("--json", action="store_true", help="print the daemon's stats as JSON")
    p.set_defaults(fn=cmd_status)

    db = command_group(sub, common, "db", "database maintenance")
    p = db.add_parser(
        "backup",
        parents=[common],
        help="copy the database to PATH (safe while the daemon runs)",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    p.set_defaults(fn=cmd_db_backup)

    keys = _subcommands(sub.choices["keys"])
    p = keys.add_parser(
        "rotate-signing",
        parents=[common],
        help="make a new WiFi grant signing key; the old one verifies for one grant lifetime "
        "(on PostgreSQL: for every daemon, signing after wifi.key_propagation_seconds)",
    )
    p.set_defaults(fn=cmd_keys_rotate_signing)
    p = keys.add_parser(
        "reseal",
        parents=[common],
        help="PostgreSQL: seal every private key in the store under "
        "store.key_encryption_key_file (rotating the KEK, docs/scaling.md)",
    )
    p.set_defaults(fn=cmd_keys_reseal)
