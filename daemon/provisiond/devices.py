"""The device record and the queries every feature shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlite_utils

from provisiond.clock import iso_utc
from provisiond.errors import NotFound
from provisiond.store import Migration
from provisiond.wifi.crypto import CAP_WIFI_UPLOAD

WIFI_UPLOAD = CAP_WIFI_UPLOAD

MIGRATIONS: list[Migration] = [
    Migration(
        "devices-1",
        """
        CREATE TABLE devices (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            org_id INTEGER NOT NULL REFERENCES orgs(id),
            owner_id INTEGER NOT NULL REFERENCES users(id),
            state TEXT NOT NULL DEFAULT 'pending',
            capabilities INTEGER NOT NULL DEFAULT 0,
            public_key BLOB,
            firmware_version TEXT,
            created_at REAL NOT NULL,
            activated_at REAL,
            reprovisioned_at REAL
        );
        CREATE INDEX devices_org ON devices(org_id, id);
        CREATE TABLE provision_tokens (
            hash TEXT PRIMARY KEY,
            device_id INTEGER NOT NULL REFERENCES devices(id),
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL,
            revoked_at REAL
        );
        CREATE INDEX provision_tokens_device ON provision_tokens(device_id);
        """,
    ),
    # At most one unused, unrevoked token per device, whatever the code does;
    # and "my devices" listings for user-scoped keys without a scan.
    Migration(
        "devices-2-provisioning",
        """
        CREATE UNIQUE INDEX provision_tokens_one_open
            ON provision_tokens(device_id) WHERE used_at IS NULL AND revoked_at IS NULL;
        CREATE INDEX devices_owner ON devices(org_id, owner_id, id);
        """,
    ),
]

COLUMNS = (
    "id, org_id, owner_id, state, capabilities, public_key, firmware_version,"
    " created_at, activated_at, reprovisioned_at"
)


@dataclass(frozen=True)
class Device:
    id: int
    org_id: int
    owner_id: int
    state: str  # pending (token issued, never activated) | active | decommissioned
    capabilities: int
    public_key: bytes | None
    firmware_version: str | None
    created_at: float
    activated_at: float | None
    reprovisioned_at: float | None

    @property
    def active(self) -> bool:
        return self.state == "active" and self.public_key is not None

    @property
    def wifi_capable(self) -> bool:
        return bool(self.capabilities & WIFI_UPLOAD)


def find_device(db: sqlite_utils.Database, device_id: int) -> Device | None:
    row = db.execute(f"SELECT {COLUMNS} FROM devices WHERE id = ?", [device_id]).fetchone()  # noqa: S608 - constant columns
    return None if row is None else device_from_row(row)


_FIELDS = tuple(COLUMNS.replace(" ", "").split(","))


def device_from_row(row: tuple[object, ...]) -> Device:
    """Build a Device from a row selected with `COLUMNS`."""
    values: dict[str, Any] = dict(zip(_FIELDS, row, strict=True))
    if values["public_key"] is not None:
        values["public_key"] = bytes(values["public_key"])
    return Device(**values)


class DeviceCache:
    """Device records read recently, so a grant needs no store trip.

    Local writes to a device call `forget` once committed; another process's
    commits (the CLI, a second daemon on the same store) move SQLite's
    `PRAGMA data_version`, which the router polls a few times a second and
    passes to `observe`, clearing everything. A change made elsewhere is
    therefore seen within one poll interval, as with API keys.

    A read that started before a `forget` must not refill the cache with what
    it saw: `generation` is taken before the read and `put` ignores results
    from an older generation.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._devices: dict[int, Device] = {}
        self.generation = 0
        self.data_version: int | None = None

    def get(self, device_id: int) -> Device | None:
        return self._devices.get(device_id)

    def put(self, device: Device, generation: int) -> None:
        if generation != self.generation:
            return
        if len(self._devices) >= self.MAX_ENTRIES:
            self._devices.clear()
        self._devices[device.id] = device

    def forget(self, device_id: int) -> None:
        self.generation += 1
        self._devices.pop(device_id, None)

    def observe(self, data_version: int) -> None:
        if data_version != self.data_version:
            self.generation += 1
            self._devices.clear()
            self.data_version = data_version


def get_device(db: sqlite_utils.Database, device_id: int, org_id: int) -> Device:
    """The device if it exists in `org_id`; otherwise 404 — never revealing which."""
    device = find_device(db, device_id)
    if device is None or device.org_id != org_id:
        raise NotFound(f"device {device_id} not found", code="device_not_found", field="deviceId")
    return device


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_utc(ts)


def device_view(device: Device) -> dict[str, Any]:
    """The public shape of a device, shared by the RPC reads and the CLI."""
    return {
        "deviceId": device.id,
        "orgId": device.org_id,
        "ownerId": device.owner_id,
        "state": device.state,
        "capabilities": device.capabilities,
        "firmware_version": device.firmware_version,
        "created_at": _iso(device.created_at),
        "activated_at": _iso(device.activated_at),
        "reprovisioned_at": _iso(device.reprovisioned_at),
    }


def list_devices(
    db: sqlite_utils.Database,
    *,
    org_id: int | None,
    owner_id: int | None = None,
    after: int = 0,
    limit: int | None = None,
) -> list[Device]:
    """Devices by id, optionally limited to one organisation and owner (None: no filter)."""
    where = ["id > ?"]
    params: list[Any] = [after]
    if org_id is not None:
        where.append("org_id = ?")
        params.append(org_id)
    if owner_id is not None:
        where.append("owner_id = ?")
        params.append(owner_id)
    sql = f"SELECT {COLUMNS} FROM devices WHERE {' AND '.join(where)} ORDER BY id"  # noqa: S608 - constant fragments
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [device_from_row(row) for row in db.execute(sql, params).fetchall()]
