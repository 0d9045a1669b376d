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

from provisiond.errors import Unavailable
from provisiond.store import Migration

INT32_MAX = 2**31 - 1
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
    """Take the next device id without creating the device (inside the caller's transaction)."""
    # sqlite_sequence holds AUTOINCREMENT's high-water mark: bumping it makes
    # the id ours, and SQLite never hands it to a plain INSERT afterwards.
    db.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'devices', COALESCE(MAX(id), 0)"
        " FROM devices WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'devices')"
    )
    db.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'devices'")
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'devices'").fetchone()
    device_id = int(row[0])
    if device_id > INT32_MAX:
        # The seed's deviceId is int32; handing out a bigger one would break clients.
        raise Unavailable("device id space exhausted", code="device_ids_exhausted")
    db.execute(
        "INSERT INTO device_id_reservations (device_id, created_at) VALUES (?, ?)",
        [device_id, now],
    )
    return device_id


def insert_reserved_device(
    db: sqlite_utils.Database, *, device_id: int, org_id: int, owner_id: int, now: float
) -> None:
    """The device row for a reserved id; the reservation ends in the same transaction."""
    cur = db.execute("DELETE FROM device_id_reservations WHERE device_id = ?", [device_id])
    if cur.rowcount != 1:
        # Swept as stale by sync meanwhile: its account may be gone.
        raise Unavailable("device id reservation expired; retry", code="reservation_expired")
    db.execute(
        "INSERT INTO devices (id, org_id, owner_id, state, created_at)"
        " VALUES (?, ?, ?, 'pending', ?)",
        [device_id, org_id, owner_id, now],
    )


def release(db: sqlite_utils.Database, device_id: int) -> None:
    db.execute("DELETE FROM device_id_reservations WHERE device_id = ?", [device_id])


def snapshot(db: sqlite_utils.Database, *, now: float) -> tuple[dict[int, str], set[int], set[int]]:
    """(state of every device, ids reserved in flight, ids reserved and stale)."""
    states = {
        int(row[0]): str(row[1]) for row in db.execute("SELECT id, state FROM devices").fetchall()
    }
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
