"""Whole-suite secret check: no secret a test generated may appear in any log or event.

Every structlog event of every in-process daemon (raw, before redaction) and
every payload the daemons publish on events and presence topics are kept for
the session; every API key, provision token, session key and WiFi password
the tests create or receive is remembered (`support.remember_secret`). At the
end of the session the two are compared. Devices' broker passwords
(`support.remember_password`) are also looked for in every store file the
session's configs named (on `--store postgresql`: in every row of every
database the session made).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion

import support

PUBLISHED: list[str] = []
_lock = threading.Lock()


def base_processors() -> list[Any]:
    """Processors every test runs with: the session sink, then whatever else."""
    return [support.log_sink, structlog.processors.JSONRenderer()]


@pytest.fixture(scope="session", autouse=True)
def secret_leak_check(broker: support.Broker) -> Iterator[None]:
    structlog.configure(processors=base_processors(), cache_logger_on_first_use=False)
    listener = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, client_id="leakcheck")

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with _lock:
            PUBLISHED.append(f"{msg.topic} {msg.payload.decode('utf-8', 'replace')}")

    listener.on_message = on_message
    listener.on_connect = lambda c, *_a: (
        c.subscribe("+/events/#"),
        c.subscribe("+/devices/+/presence"),
    )
    listener.connect("127.0.0.1", broker.port)
    listener.loop_start()
    yield
    listener.loop_stop()
    with contextlib.suppress(Exception):
        listener.disconnect()
    secrets = {s for s in support.SECRETS if len(s) >= 12}
    leaks: list[str] = []
    for where, corpus in (("log", support.LOG_EVENTS), ("event", PUBLISHED)):
        for text in corpus:
            for secret in secrets:
                if secret in text:
                    leaks.append(f"{where}: {text[:200]}")
    # Devices' broker passwords: nowhere in a store file either (databases and
    # their WAL), where only the sealed replay record may hold them, encrypted.
    passwords = [p.encode() for p in support.BROKER_PASSWORDS if len(p) >= 12]
    for path in support.STORE_FILES:
        for name in (path, path + "-wal"):
            with contextlib.suppress(FileNotFoundError):
                data = Path(name).read_bytes()
                leaks += [f"store file {name}" for p in passwords if p in data]
    for url in support.STORE_URLS:
        text = _database_text(url)
        # Text columns as they are, BYTEA ones as PostgreSQL prints them (hex).
        leaks += [f"store {url}" for p in passwords if p.decode() in text or p.hex() in text]
    assert not leaks, f"{len(leaks)} secret(s) leaked, e.g. {leaks[:3]}"


def _database_text(url: str) -> str:
    """Every row of every table of a PostgreSQL database, as text."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        ]
        return "\n".join(
            str(row[0])
            for table in tables
            for row in conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))
            )
        )
