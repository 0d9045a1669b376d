"""The `presence` table: every query of it, for both modes (docs/presence-and-commands.md).

`tracker.Presence` (one daemon) saves its view here once a second and loads
it at start; `shared.SharedPresence` (a group of daemons) records heartbeats
here and the leader decides here (docs/scaling.md). All run on the store
thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from provisiond import devices
from provisiond.store import Migration

MQTT = "mqtt"
# Active-device lookups, this many ids per query.
LOOKUP_CHUNK = 500

MIGRATIONS: list[Migration] = [
    Migration(
        "presence-1",
        """
        CREATE TABLE presence (
            device_id INTEGER PRIMARY KEY,
            online INTEGER NOT NULL,
            channels TEXT NOT NULL,
            last_seen REAL,
            since REAL,
            deadline REAL
        );
        """,
    ),
    # For daemons that share a fleet (`presence.shared`): the state
    # last published (`mqtt_up`, `online`, `channels`) apart from what the
    # heartbeats say (`deadline`), plugin channels, and a revision per change
    # that the other daemons follow.
    Migration(
        "presence-2",
        """
        ALTER TABLE presence ADD COLUMN mqtt_up INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE presence ADD COLUMN extra TEXT;
        ALTER TABLE presence ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE presence ADD COLUMN unpublished INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE presence ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
        UPDATE presence SET mqtt_up = 1 WHERE deadline IS NOT NULL;
        CREATE INDEX presence_mqtt ON presence(mqtt_up, deadline);
        CREATE INDEX presence_rev ON presence(rev);
        CREATE INDEX presence_seen ON presence(last_seen);
        CREATE INDEX presence_pending ON presence(device_id) WHERE pending = 1;
        CREATE INDEX presence_unpublished ON presence(device_id) WHERE unpublished = 1;
        """,
    ),
]


# --- store functions (run on the store thread)


def load(
    db: sqlite_utils.Database,
) -> list[tuple[int, int, float | None, float | None, float | None]]:
    """Every active device, with its saved presence where there is one."""
    saved = {
        row[0]: row[1:]
        for row in db.execute(
            "SELECT device_id, online, last_seen, since, deadline FROM presence"
        ).fetchall()
    }
    loaded = []
    for device_id in devices.active_ids(db):
        online, last_seen, since, deadline = saved.get(device_id, (0, None, None, None))
        loaded.append((device_id, online or 0, last_seen, since, deadline))
    return loaded


def forget_row(db: sqlite_utils.Database, device_id: int) -> None:
    """A decommissioned device's saved presence goes (`Presence.device_removed` forgets the rest)."""
    db.execute("DELETE FROM presence WHERE device_id = ?", [device_id])


def save(db: sqlite_utils.Database, rows: list[tuple[Any, ...]]) -> None:
    db.conn.executemany(
        "INSERT INTO presence (device_id, online, channels, last_seen, since, deadline, mqtt_up)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
        " online = excluded.online, channels = excluded.channels,"
        " last_seen = excluded.last_seen, since = excluded.since, deadline = excluded.deadline,"
        " mqtt_up = excluded.mqtt_up",
        rows,
    )


# --- presence shared by several daemons (`presence.shared`)


@dataclass(frozen=True)
class Row:
    """A device's presence as the daemons of a group share it."""

    device_id: int
    mqtt: bool
    extra: tuple[str, ...]
    last_seen: float | None
    since: float | None

    @property
    def channels(self) -> list[str]:
        return ([MQTT] if self.mqtt else []) + sorted(self.extra)


def record_beats(
    db: sqlite_utils.Database,
    beats: list[tuple[int, float, float]],
    wills: list[tuple[int, float]],
) -> None:
    """A heartbeat newer than the one the row holds sets the device's deadline
    (later or earlier: each heartbeat stands alone, as with one daemon); an
    older one, flushed late by another daemon, changes nothing. An `offline`
    brings the deadline forward to its time."""
    if beats:
        db.conn.executemany(
            "INSERT INTO presence (device_id, online, channels, deadline, last_seen)"
            " VALUES (?, 0, '[]', ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
            " deadline = CASE WHEN presence.last_seen IS NULL"
            "  OR presence.last_seen <= excluded.last_seen THEN excluded.deadline"
            "  ELSE presence.deadline END,"
            " last_seen = CASE WHEN presence.last_seen IS NULL"
            "  OR presence.last_seen < excluded.last_seen THEN excluded.last_seen"
            "  ELSE presence.last_seen END",
            beats,
        )
    if wills:
        db.conn.executemany(
            "UPDATE presence SET deadline = ? WHERE device_id = ? AND deadline > ?",
            [(at, device_id, at) for device_id, at in wills],
        )


def record_channels(db: sqlite_utils.Database, reports: list[tuple[int, str, bool]]) -> None:
    """Plugin channels up or down; the leader publishes the change."""
    for device_id, channel, online in reports:
        row = db.execute("SELECT extra FROM presence WHERE device_id = ?", [device_id]).fetchone()
        extra = set(json.loads(row[0])) if row and row[0] else set()
        if online:
            extra.add(channel)
        else:
            extra.discard(channel)
        db.execute(
            "INSERT INTO presence (device_id, online, channels, extra, pending)"
            " VALUES (?, 0, '[]', ?, 1) ON CONFLICT(device_id) DO UPDATE SET"
            " extra = excluded.extra, pending = 1",
            [device_id, json.dumps(sorted(extra))],
        )


def decide(db: sqlite_utils.Database, *, now: float) -> tuple[int, list[Row]]:
    """The leader's sweep: every device whose channels differ from what was last
    published becomes a new revision, to be published; returns (revision, rows).

    Devices that are no longer active lose their row instead.
    """
    found: dict[int, tuple[Any, ...]] = {}
    select = "SELECT device_id, deadline, extra, last_seen, since, online FROM presence WHERE "
    for where, params in _undecided(now):
        for row in db.execute(select + where, params).fetchall():
            found[int(row[0])] = row
    if not found:
        return 0, []
    ids = list(found)
    active: set[int] = set()
    for start in range(0, len(ids), LOOKUP_CHUNK):
        active |= devices.active_among(db, ids[start : start + LOOKUP_CHUNK])
    gone = [(device_id,) for device_id in found if device_id not in active]
    if gone:
        db.conn.executemany("DELETE FROM presence WHERE device_id = ?", gone)
    rev = int(db.execute("SELECT COALESCE(MAX(rev), 0) FROM presence").fetchone()[0]) + 1
    decided: list[Row] = []
    updates: list[tuple[Any, ...]] = []
    for device_id, deadline, extra, last_seen, since, online in found.values():
        if device_id not in active:
            continue
        mqtt = deadline is not None and deadline > now
        row = Row(int(device_id), mqtt, tuple(json.loads(extra) if extra else ()), last_seen, since)
        now_online = bool(row.channels)
        if now_online != bool(online):
            # Offline by expiry is dated by its deadline, not by when it was noticed.
            at = deadline if not now_online and deadline is not None and deadline <= now else now
            row = Row(row.device_id, row.mqtt, row.extra, row.last_seen, at)
        decided.append(row)
        updates.append(
            (int(mqtt), int(now_online), json.dumps(row.channels), row.since, rev, row.device_id)
        )
    db.conn.executemany(
        "UPDATE presence SET mqtt_up = ?, online = ?, channels = ?, since = ?, pending = 0,"
        " unpublished = 1, rev = ? WHERE device_id = ?",
        updates,
    )
    return rev, decided


def changed_since(db: sqlite_utils.Database, rev: int) -> tuple[int, list[Row]]:
    """Revisions after `rev` (what other daemons decided): (latest revision, rows)."""
    rows = db.execute(
        "SELECT device_id, mqtt_up, extra, last_seen, since, rev FROM presence"
        " WHERE rev > ? ORDER BY rev",
        [rev],
    ).fetchall()
    latest = max((int(r[5]) for r in rows), default=rev)
    return latest, [
        Row(int(r[0]), bool(r[1]), tuple(json.loads(r[2]) if r[2] else ()), r[3], r[4])
        for r in rows
    ]


def load_shared(db: sqlite_utils.Database) -> tuple[int, list[Row]]:
    """Every active device as last decided, and the latest revision."""
    saved = {
        int(r[0]): r
        for r in db.execute(
            "SELECT device_id, mqtt_up, extra, last_seen, since FROM presence"
        ).fetchall()
    }
    rows = []
    for device_id in devices.active_ids(db):
        r = saved.get(device_id)
        if r is None:
            rows.append(Row(device_id, False, (), None, None))
        else:
            rows.append(
                Row(device_id, bool(r[1]), tuple(json.loads(r[2]) if r[2] else ()), r[3], r[4])
            )
    return int(db.execute("SELECT COALESCE(MAX(rev), 0) FROM presence").fetchone()[0]), rows


def due(db: sqlite_utils.Database, *, now: float) -> bool:
    """Whether the leader has anything to decide (reads, so an idle fleet takes no write lock).

    Three probes rather than one OR: each uses an index, where the OR would
    scan the whole table four times a second.
    """
    return any(
        db.execute(f"SELECT 1 FROM presence WHERE {where} LIMIT 1", params).fetchone()  # noqa: S608 - fixed text
        for where, params in _undecided(now)
    )


def _undecided(now: float) -> list[tuple[str, list[Any]]]:
    """The three ways a device's presence can differ from what was published."""
    return [
        ("mqtt_up = 1 AND (deadline IS NULL OR deadline <= ?)", [now]),
        ("mqtt_up = 0 AND deadline > ?", [now]),
        ("pending = 1", []),
    ]


def seen_since(db: sqlite_utils.Database, since: float) -> list[tuple[int, float]]:
    """Devices heard from after `since` (by any daemon): (device_id, last_seen)."""
    return [
        (int(r[0]), float(r[1]))
        for r in db.execute(
            "SELECT device_id, last_seen FROM presence WHERE last_seen > ?", [since]
        ).fetchall()
    ]


def unpublished(db: sqlite_utils.Database) -> list[tuple[int, int]]:
    """Decisions a leader made and may not have published: (device_id, rev)."""
    return [
        (int(r[0]), int(r[1]))
        for r in db.execute("SELECT device_id, rev FROM presence WHERE unpublished = 1")
    ]


def mark_published(db: sqlite_utils.Database, published: list[tuple[int, int]]) -> None:
    """Published; a newer decision about the same device stays to be published."""
    db.conn.executemany(
        "UPDATE presence SET unpublished = 0 WHERE device_id = ? AND rev = ?", published
    )
