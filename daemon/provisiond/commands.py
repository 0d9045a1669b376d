"""Device commands (reconfigure): stored first, delivered when the device is reachable.

A command's life: `queued` → `sent` → `acked`, or `expired` when its TTL
passes first (queued: never published; sent: the device must not act on it
any more), or `superseded` when a newer command of the same kind is queued
for the device before it was sent. Every state is a row in `commands`, so it
survives a restart; every transition is an event on `P/events/command`.

Delivery is at least once (publish, then record `sent`): a crash between the
two re-sends the command after the restart, and devices de-duplicate by `id`.
One delivery runs per device at a time, which is what keeps a command from
being published twice by the daemon's own paths (RPC, presence, sweeper).
When several daemons share the fleet (`[mqtt] shared_group`), only the
leader (`provisiond.cluster`) delivers and sweeps: a command queued through
another daemon is found by the leader's next sweep (`SHARED_SWEEP_SECONDS`),
so no two daemons publish it.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlite_utils

from provisiond.clock import iso_utc
from provisiond.cluster import Cluster
from provisiond.errors import StoreUnavailable
from provisiond.logs import get_logger
from provisiond.payloads import json_object
from provisiond.presence import Presence, parse_device_id
from provisiond.runtime.app import App
from provisiond.store import Migration
from provisiond.transport import Delivery, NotConnected, PublishRefused

log = get_logger("provisiond.commands")

RECONFIGURE = "reconfigure"
MAX_ACK_BYTES = 4096
SWEEP_SECONDS = 1.0
SHARED_SWEEP_SECONDS = 0.5
COMMAND_ID = re.compile(r"cmd_[0-9a-f]{16}")

MIGRATIONS: list[Migration] = [
    Migration(
        "commands-1",
        """
        CREATE TABLE commands (
            id TEXT PRIMARY KEY,
            device_id INTEGER NOT NULL REFERENCES devices(id),
            command TEXT NOT NULL,
            state TEXT NOT NULL,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            sent_at REAL,
            acked_at REAL,
            result TEXT,
            key_id TEXT
        );
        CREATE INDEX commands_state ON commands(state, expires_at);
        CREATE INDEX commands_device ON commands(device_id, state);
        """,
    ),
]


@dataclass(frozen=True)
class Command:
    id: str
    device_id: int
    command: str
    issued_at: float
    expires_at: float

    def payload(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "command": self.command,
                "issued_at": iso_utc(self.issued_at),
                "expires_at": iso_utc(self.expires_at),
            },
            separators=(",", ":"),
        ).encode()


# --- store functions (run on the store thread)


def queue_command(
    db: sqlite_utils.Database,
    *,
    command_id: str,
    device_id: int,
    command: str,
    issued_at: float,
    expires_at: float,
    key_id: str | None,
) -> list[str]:
    """Insert a queued command; returns the ids of the unsent ones it supersedes."""
    superseded = [
        row[0]
        for row in db.execute(
            "SELECT id FROM commands WHERE device_id = ? AND command = ? AND state = 'queued'",
            [device_id, command],
        ).fetchall()
    ]
    if superseded:
        db.execute(
            "UPDATE commands SET state = 'superseded' WHERE device_id = ? AND command = ?"
            " AND state = 'queued'",
            [device_id, command],
        )
    db.execute(
        "INSERT INTO commands (id, device_id, command, state, issued_at, expires_at, key_id)"
        " VALUES (?, ?, ?, 'queued', ?, ?, ?)",
        [command_id, device_id, command, issued_at, expires_at, key_id],
    )
    return superseded


def claim(
    db: sqlite_utils.Database, *, device_id: int, now: float
) -> tuple[list[Command], list[str]]:
    """The device's live queued commands, oldest first; overdue ones are expired now."""
    expired = [
        row[0]
        for row in db.execute(
            "SELECT id FROM commands WHERE device_id = ? AND state = 'queued' AND expires_at <= ?",
            [device_id, now],
        ).fetchall()
    ]
    if expired:
        db.execute(
            "UPDATE commands SET state = 'expired' WHERE device_id = ? AND state = 'queued'"
            " AND expires_at <= ?",
            [device_id, now],
        )
    live = [
        Command(row[0], device_id, row[1], row[2], row[3])
        for row in db.execute(
            "SELECT id, command, issued_at, expires_at FROM commands"
            " WHERE device_id = ? AND state = 'queued' ORDER BY issued_at, id",
            [device_id],
        ).fetchall()
    ]
    return live, expired


def mark_sent(db: sqlite_utils.Database, *, command_id: str, now: float) -> str:
    """Record the publish; returns the resulting state.

    A command that expired or was superseded while it was being published keeps
    that state, but `sent_at` still records that the device was sent it.
    """
    db.execute(
        "UPDATE commands SET sent_at = ?,"
        " state = CASE WHEN state = 'queued' THEN 'sent' ELSE state END WHERE id = ?",
        [now, command_id],
    )
    row = db.execute("SELECT state FROM commands WHERE id = ?", [command_id]).fetchone()
    return str(row[0]) if row else "missing"


def record_ack(
    db: sqlite_utils.Database, *, device_id: int, command_id: str, result: str | None, now: float
) -> str | None:
    """Mark a sent command acked; returns its command name, or None if nothing was acked."""
    row = db.execute(
        "SELECT command FROM commands WHERE id = ? AND device_id = ? AND sent_at IS NOT NULL"
        " AND state IN ('sent', 'expired', 'superseded')",
        [command_id, device_id],
    ).fetchone()
    if row is None:
        return None
    db.execute(
        "UPDATE commands SET state = 'acked', acked_at = ?, result = ? WHERE id = ?",
        [now, result, command_id],
    )
    return str(row[0])


def overdue(db: sqlite_utils.Database, *, now: float) -> tuple[bool, set[int]]:
    """Whether any sent command is past its expiry, and the devices with overdue queued ones."""
    sent = db.execute(
        "SELECT 1 FROM commands WHERE state = 'sent' AND expires_at <= ? LIMIT 1", [now]
    ).fetchone()
    devices = {
        int(r[0])
        for r in db.execute(
            "SELECT DISTINCT device_id FROM commands WHERE state = 'queued' AND expires_at <= ?",
            [now],
        ).fetchall()
    }
    return sent is not None, devices


def expire_sent(db: sqlite_utils.Database, *, now: float) -> list[tuple[str, int, str]]:
    """Sent commands never acked before their expiry: (id, device_id, command)."""
    rows = [
        (str(r[0]), int(r[1]), str(r[2]))
        for r in db.execute(
            "SELECT id, device_id, command FROM commands WHERE state = 'sent' AND expires_at <= ?",
            [now],
        ).fetchall()
    ]
    if rows:
        db.execute(
            "UPDATE commands SET state = 'expired' WHERE state = 'sent' AND expires_at <= ?", [now]
        )
    return rows


def drop_for_device(db: sqlite_utils.Database, device_id: int) -> int:
    """A decommissioned device's queued and sent commands will never be delivered; returns how many."""
    cur = db.execute(
        "UPDATE commands SET state = 'dropped' WHERE device_id = ? AND state IN ('queued', 'sent')",
        [device_id],
    )
    return int(cur.rowcount)


def live_counts(db: sqlite_utils.Database) -> dict[str, int]:
    """Commands waiting now: queued (device offline) and sent but not yet acknowledged."""
    # Only the live states: acked/expired/superseded rows pile up over time.
    # Indexed by (state, expires_at).
    rows = db.execute(
        "SELECT state, COUNT(*) FROM commands WHERE state IN ('queued', 'sent') GROUP BY state"
    ).fetchall()
    found = {"queued": 0, "sent": 0}
    found.update({str(state): int(n) for state, n in rows})
    return found


def queued_devices(db: sqlite_utils.Database) -> set[int]:
    return {
        int(r[0])
        for r in db.execute("SELECT DISTINCT device_id FROM commands WHERE state = 'queued'")
    }


# --- the service


class Commands:
    """Delivers queued commands when their device's MQTT channel is online."""

    def __init__(self, app: App, presence: Presence, cluster: Cluster) -> None:
        self._app = app
        self._presence = presence
        self._cluster = cluster
        # Devices that may have queued commands: a hint kept exact enough that a
        # device coming online costs a store call only when it has something due.
        self._pending: set[int] = set()
        self._busy: set[int] = set()
        self._again: set[int] = set()

    def ttl_seconds(self) -> int:
        return self._app.config.commands.ttl_seconds

    def is_offline(self, device_id: int) -> bool:
        return self._presence.is_offline(device_id)

    def _reachable(self, device_id: int) -> bool:
        # Commands travel on MQTT, so only that channel can carry them; a
        # device seen only over BLE keeps its command queued.
        return self._presence.mqtt_online(device_id)

    async def start(self) -> None:
        self._pending = await self._app.store.call(queued_devices)
        self._presence.add_listener(self._on_presence)
        self._app.spawn(self._sweep_loop(), name="commands-sweep")

    def _on_presence(self, device_id: int) -> None:
        if device_id in self._pending and self._reachable(device_id):
            self.kick(device_id)

    def kick(self, device_id: int) -> None:
        """Deliver (or expire) the device's queued commands, one delivery per device at a time."""
        self._pending.add(device_id)
        if not self._cluster.is_leader:
            return  # the leader's sweep delivers it
        if device_id in self._busy:
            self._again.add(device_id)
            return
        self._busy.add(device_id)
        self._app.spawn(self._settle_loop(device_id), name=f"commands-deliver-{device_id}")

    async def queued(
        self, device_id: int, command: str, command_id: str, superseded: list[str]
    ) -> None:
        """After a command was stored: announce it, then deliver if the device is reachable."""
        for old in superseded:
            await self._event(device_id, old, command, "superseded")
        await self._event(device_id, command_id, command, "queued")
        self.kick(device_id)

    async def _settle_loop(self, device_id: int) -> None:
        try:
            while True:
                self._again.discard(device_id)
                try:
                    await self._settle(device_id)
                except StoreUnavailable as exc:
                    log.warning("commands.store_unavailable", device=device_id, error=str(exc))
                    return  # the sweeper tries again
                if device_id not in self._again:
                    return
        finally:
            self._busy.discard(device_id)

    async def _settle(self, device_id: int) -> None:
        app = self._app
        live, expired = await app.store.write(
            partial(claim, device_id=device_id, now=app.clock.now())
        )
        for command_id in expired:
            await self._event(device_id, command_id, RECONFIGURE, "expired")
        if not live:
            self._pending.discard(device_id)
            return
        if not self._reachable(device_id) or not app.transport.is_connected:
            return
        for command in live:
            topic = app.topic("devices", device_id, "commands", command.command)
            try:
                await app.transport.publish(topic, command.payload(), qos=1)
            except NotConnected:
                return  # still queued; the sweeper retries once reconnected
            except PublishRefused as exc:
                # Still queued; the sweeper tries again at its own pace.
                log.error("command.publish_refused", device=device_id, reason=str(exc))
                return
            state = await app.store.write(
                partial(mark_sent, command_id=command.id, now=app.clock.now())
            )
            app.counters["commands.sent"] += 1
            await self._event(device_id, command.id, command.command, "sent", final_state=state)
        self._pending.discard(device_id)

    async def _sweep_loop(self) -> None:
        shared = self._cluster.shared
        while True:
            await asyncio.sleep(SHARED_SWEEP_SECONDS if shared else SWEEP_SECONDS)
            if not self._cluster.is_leader:
                continue
            try:
                if shared:
                    # Commands queued through the other daemons of the group.
                    self._pending |= await self._app.store.call(queued_devices)
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("commands.sweep_failed", error=str(exc))

    async def sweep(self) -> None:
        """Expire overdue commands and retry deliveries a disconnect interrupted."""
        app = self._app
        now = app.clock.now()
        # A read first: an idle gateway should not take the write lock every second.
        any_sent, queued_devices_due = await app.store.call(partial(overdue, now=now))
        if any_sent:
            for command_id, device_id, command in await app.store.write(
                partial(expire_sent, now=now)
            ):
                await self._event(device_id, command_id, command, "expired")
        for device_id in queued_devices_due:
            self.kick(device_id)
        if app.transport.is_connected:
            for device_id in list(self._pending):
                if device_id not in self._busy and self._reachable(device_id):
                    self.kick(device_id)

    async def on_ack(self, delivery: Delivery, values: list[str]) -> None:
        app = self._app
        device_id = parse_device_id(values[0])
        payload = delivery.payload
        parsed = _parse_ack(payload) if len(payload) <= MAX_ACK_BYTES else None
        if device_id is None or parsed is None:
            app.counters["commands.ack.malformed"] += 1
            log.debug("commands.ack_malformed", device=values[0][:24], bytes=len(payload))
            return
        command_id, result = parsed
        try:
            command = await app.store.write(
                partial(
                    record_ack,
                    device_id=device_id,
                    command_id=command_id,
                    result=result,
                    now=app.clock.now(),
                )
            )
        except StoreUnavailable as exc:
            log.warning("commands.ack_not_recorded", device=device_id, error=str(exc))
            return
        if command is None:
            app.counters["commands.ack.unknown"] += 1
            log.debug("commands.ack_unknown", device=device_id, command_id=command_id)
            return
        app.counters["commands.acked"] += 1
        await self._event(
            device_id,
            command_id,
            command,
            "acked",
            result=None if result is None else json.loads(result),
        )

    async def _event(
        self,
        device_id: int,
        command_id: str,
        command: str,
        state: str,
        *,
        final_state: str | None = None,
        result: Any = None,
    ) -> None:
        body: dict[str, Any] = {
            "deviceId": device_id,
            "commandId": command_id,
            "command": command,
            "state": state,
        }
        if final_state is not None and final_state != state:
            body["recorded_state"] = final_state
        if state == "acked":
            body["result"] = result
        await self._app.publish_event("command", body)


def _parse_ack(payload: bytes) -> tuple[str, str | None] | None:
    doc = json_object(payload)
    if doc is None:
        return None
    command_id = doc.get("id")
    if not isinstance(command_id, str) or not COMMAND_ID.fullmatch(command_id):
        return None
    result = doc.get("result")
    return command_id, None if result is None else json.dumps(result, separators=(",", ":"))
