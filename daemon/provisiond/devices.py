"""Devices: the `devices` table, its record, its cache, and the one rule for ids.

Every read and write of the table is here; features call these functions
inside their own store transactions. A device id is validated once, by the
`DeviceId` type every request body uses: 400 for zero, negative or beyond
the seed's int32, and 404 (`device_not_found`) for a well-formed id that does
not exist or belongs to another organisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final

import sqlite_utils
from pydantic import BeforeValidator, Field

from provisiond.auth import USER_IN_ORG, user_org
from provisiond.clock import iso_utc, iso_utc_or_none
from provisiond.errors import NotFound, Unavailable
from provisiond.store import Migration, check_later, dialect, take_ahead
from provisiond.wifi.crypto import CAP_WIFI_UPLOAD

WIFI_UPLOAD = CAP_WIFI_UPLOAD
INT32_MAX: Final = 2**31 - 1
INT64_MAX: Final = 2**63 - 1
_DECIMAL_ID: Final = re.compile(r"[1-9][0-9]{0,18}")


def _decimal_string(value: object) -> object:
    # The seed's grant path parameter was a string; anything not a canonical
    # decimal is left for the strict int check to refuse by name.
    if isinstance(value, str):
        if not _DECIMAL_ID.fullmatch(value):
            raise ValueError("must be a positive integer or its decimal string")
        return int(value)
    return value


# The seed's types: deviceId and orgId are int32, ownerId int64. Strict request
# bodies mean "5", 5.0 and true are refused, not coerced.
DeviceId = Annotated[int, Field(gt=0, le=INT32_MAX)]
# The same id where the integer's decimal string is also accepted (wifi-config/grant).
DeviceIdOrDecimal = Annotated[int, BeforeValidator(_decimal_string), Field(gt=0, le=INT32_MAX)]
OrgId = Annotated[int, Field(gt=0, le=INT32_MAX)]
UserId = Annotated[int, Field(gt=0, le=INT64_MAX)]

# Until 2026-12 "devices-1" and "devices-2-provisioning" also created the
# provision_tokens table and its indexes; they moved to tokens.py, whose
# migration creates them only where they are missing, so old and new
# databases end with the same schema.
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
        """,
    ),
    # "My devices" listings for user-scoped keys without a scan.
    Migration(
        "devices-2-provisioning",
        "CREATE INDEX devices_owner ON devices(org_id, owner_id, id);",
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
    state: str  # pending (token issued, not activated) | active | decommissioned | decommissioned
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
    commits (the CLI, a second daemon on the same store) are noticed by the
    watcher in `provisiond.runtime.caches`, which calls `observe`, clearing everything. A change made elsewhere is
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


def device_view(device: Device) -> dict[str, Any]:
    """The public shape of a device, shared by the RPC reads and the CLI."""
    return {
        "deviceId": device.id,
        "orgId": device.org_id,
        "ownerId": device.owner_id,
        "state": device.state,
        "capabilities": device.capabilities,
        "firmware_version": device.firmware_version,
        "created_at": iso_utc(device.created_at),
        "activated_at": iso_utc_or_none(device.activated_at),
        "reprovisioned_at": iso_utc_or_none(device.reprovisioned_at),
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


def create_device(
    db: sqlite_utils.Database,
    *,
    org_id: int,
    owner_id: int,
    now: float,
    device_id: int | None = None,
    owner_check: Callable[[], Exception] | None = None,
) -> int:
    """Insert a pending device (with an id `reserve_id` gave, or the next one); returns its id.

    With `owner_check`, only if `owner_id` is a user of `org_id`; otherwise
    the exception it makes is raised and no device is created (on
    PostgreSQL possibly only before the COMMIT: `store.check_later`).
    """
    if device_id is None and dialect(db) == "postgresql":
        return _create_pipelined(db, org_id=org_id, owner_id=owner_id, now=now, check=owner_check)
    if owner_check is not None and user_org(db, owner_id) != org_id:
        raise owner_check()
    if device_id is None:
        row = db.execute(
            "INSERT INTO devices (org_id, owner_id, state, created_at)"
            " VALUES (?, ?, 'pending', ?) RETURNING id",
            [org_id, owner_id, now],
        ).fetchone()
    else:
        row = db.execute(
            "INSERT INTO devices (id, org_id, owner_id, state, created_at)"
            " VALUES (?, ?, ?, 'pending', ?) RETURNING id",
            [device_id, org_id, owner_id, now],
        ).fetchone()
    new_id = int(row[0])
    _check_id_space(new_id)
    return new_id


# Device ids drawn from the sequence at once on PostgreSQL. A daemon that
# stops leaves the rest of its block unused (a gap in the ids, as a
# rolled-back INSERT leaves there anyway).
ID_BLOCK = 64


def _create_pipelined(
    db: sqlite_utils.Database,
    *,
    org_id: int,
    owner_id: int,
    now: float,
    check: Callable[[], Exception] | None,
) -> int:
    """PostgreSQL: a device whose id is known before the server answers, so the
    write it belongs to is sent whole (the token and the replay record need the
    id); the owner check is part of the INSERT, and its answer is read later."""
    device_id = take_ahead(db, "devices.id", _DRAW_IDS, [ID_BLOCK])
    _check_id_space(device_id)
    if check is None:
        db.execute(
            "INSERT INTO devices (id, org_id, owner_id, state, created_at)"
            " VALUES (?, ?, ?, 'pending', ?)",
            [device_id, org_id, owner_id, now],
        )
        return device_id
    refuse = check
    cur = db.execute(
        "INSERT INTO devices (id, org_id, owner_id, state, created_at)"
        f" SELECT ?, ?, ?, 'pending', ? WHERE {USER_IN_ORG}",
        [device_id, org_id, owner_id, now, owner_id, org_id],
    )

    def inserted() -> None:
        if cur.rowcount != 1:
            raise refuse()

    check_later(db, inserted)
    return device_id


_DRAW_IDS = "SELECT nextval(pg_get_serial_sequence('devices', 'id')) FROM generate_series(1, ?)"


def _check_id_space(device_id: int) -> None:
    if device_id > INT32_MAX:
        # The seed's deviceId is int32; handing out a bigger one would break clients.
        raise Unavailable("device id space exhausted", code="device_ids_exhausted")


def reserve_id(db: sqlite_utils.Database) -> int:
    """Take the next device id without creating the device (inside the caller's transaction).

    For a device whose broker account must exist before its row does; the
    row comes later with `create_device(..., device_id=...)`.
    """
    if dialect(db) == "postgresql":
        row = db.execute("SELECT nextval(pg_get_serial_sequence('devices', 'id'))").fetchone()
        device_id = int(row[0])
        _check_id_space(device_id)
        return device_id
    # sqlite_sequence holds AUTOINCREMENT's high-water mark: bumping it makes
    # the id ours, and SQLite never hands it to a plain INSERT afterwards.
    db.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'devices', COALESCE(MAX(id), 0)"
        " FROM devices WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'devices')"
    )
    db.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'devices'")
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'devices'").fetchone()
    device_id = int(row[0])
    _check_id_space(device_id)
    return device_id


def active_ids(db: sqlite_utils.Database) -> list[int]:
    """The ids of every active device (presence tracks them from the start)."""
    return [row[0] for row in db.execute("SELECT id FROM devices WHERE state = 'active'")]


def active_among(db: sqlite_utils.Database, ids: list[int]) -> set[int]:
    """Which of `ids` are active devices (one query for a batch of heartbeats)."""
    marks = ",".join("?" * len(ids))
    sql = f"SELECT id FROM devices WHERE state = 'active' AND id IN ({marks})"  # noqa: S608 - placeholders only
    return {row[0] for row in db.execute(sql, ids).fetchall()}


def states(db: sqlite_utils.Database) -> dict[int, str]:
    """Every device's state, by id (broker-account sync compares them with the broker)."""
    return {int(row[0]): str(row[1]) for row in db.execute("SELECT id, state FROM devices")}


def mark_decommissioned(db: sqlite_utils.Database, device_id: int) -> None:
    """The row stays for audit; a re-provision brings the device back (`mark_reprovisioned`)."""
    db.execute("UPDATE devices SET state = 'decommissioned' WHERE id = ?", [device_id])


def activate(
    db: sqlite_utils.Database,
    device_id: int,
    *,
    capabilities: int,
    public_key: bytes,
    firmware_version: str | None,
    now: float,
) -> Device:
    """Record an activation; returns the device as it was before it."""
    before = find_device(db, device_id)
    assert before is not None  # tokens reference devices, which are never deleted
    db.execute(
        "UPDATE devices SET state = 'active', capabilities = ?, public_key = ?,"
        " firmware_version = ?, activated_at = ? WHERE id = ?",
        [capabilities, public_key, firmware_version, now, device_id],
    )
    return before


def mark_reprovisioned(db: sqlite_utils.Database, device_id: int, *, now: float) -> None:
    """A new token was issued; a decommissioned device comes back as a pending one."""
    db.execute(
        "UPDATE devices SET reprovisioned_at = ?,"
        " state = CASE state WHEN 'decommissioned' THEN 'pending' ELSE state END WHERE id = ?",
        [now, device_id],
    )
