"""Store side of account provisioning: device ids reserved before the account exists.

An account is named after its device, and must exist before the device row
is committed (a broker that refuses must leave no row behind). So
`provision/token` first *reserves* the id — bumping the devices table's
AUTOINCREMENT counter and recording the reservation, no device row — then
makes the account, then commits the row with that id and drops the
reservation in the same transaction.

A reservation still present after `STALE_SECONDS` belongs to a request that
crashed or failed half way: `sync` removes its account. Younger ones are in
flight, and sync leaves their accounts alone.
"""

from __future__ import annotations

import sqlite_utils

from provisiond import devices
from provisiond.errors import Unavailable
from provisiond.store import Migration

STALE_SECONDS = 60.0

MIGRATIONS: list[Migration] = [
    Migration(
        "broker-accounts-1",
        """
        CREATE TABLE device_id_reservations (
            device_id INTEGER PRIMARY KEY,
            created_at REAL NOT NULL
        );
        """,
    ),
    Migration(
        "broker-accounts-2-certificates",
        """
        CREATE TABLE device_certificates (
            serial TEXT PRIMARY KEY,
            device_id INTEGER NOT NULL REFERENCES devices(id),
            issued_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE INDEX device_certificates_device ON device_certificates(device_id);
        """,
    ),
]


def reserve_device_id(db: sqlite_utils.Database, *, now: float) -> int:
    """Take the next device id and record the reservation (inside the caller's transaction)."""
    device_id = devices.reserve_id(db)
    db.execute(
        "INSERT INTO device_id_reservations (device_id, created_at) VALUES (?, ?)",
        [device_id, now],
    )
    return device_id


def claim_reservation(db: sqlite_utils.Database, device_id: int) -> None:
    """The reserved id's device row is being committed: the reservation ends with it."""
    cur = db.execute("DELETE FROM device_id_reservations WHERE device_id = ?", [device_id])
    if cur.rowcount != 1:
        # Swept as stale by sync meanwhile: its account may be gone.
        raise Unavailable("device id reservation expired; retry", code="reservation_expired")


def release(db: sqlite_utils.Database, device_id: int) -> None:
    db.execute("DELETE FROM device_id_reservations WHERE device_id = ?", [device_id])


def snapshot(db: sqlite_utils.Database, *, now: float) -> tuple[dict[int, str], set[int], set[int]]:
    """(state of every device, ids reserved in flight, ids reserved and stale)."""
    states = devices.states(db)
    in_flight: set[int] = set()
    stale: set[int] = set()
    for device_id, created_at in db.execute(
        "SELECT device_id, created_at FROM device_id_reservations"
    ).fetchall():
        (stale if created_at <= now - STALE_SECONDS else in_flight).add(int(device_id))
    return states, in_flight, stale


def drop_reservations(db: sqlite_utils.Database, ids: set[int]) -> None:
    db.conn.executemany(
        "DELETE FROM device_id_reservations WHERE device_id = ?", [(i,) for i in ids]
    )
