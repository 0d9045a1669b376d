"""Presence when several daemons share one fleet (docs/scaling.md, "Presence across daemons").

Each daemon of a `shared_group` receives a share of the device topics, so no
daemon sees all of a device's heartbeats. What they share is the store:

- every daemon records the heartbeats it receives, batched every
  `FLUSH_SECONDS`; the newest heartbeat of a device sets its deadline;
- the leader (`provisiond.cluster`) decides every `SWEEP_SECONDS`: each device
  whose deadline or plugin channels no longer match what was last published
  becomes a new revision, written before it is published, and published once;
- the others follow the revisions into their own view, which is what
  `presence_of`, `is_offline` and `mqtt_online` answer from.

A leader killed between committing a revision and publishing it leaves the
revision marked unpublished; the next leader publishes it. A presence
change is therefore late by at most `SWEEP_SECONDS` plus the takeover
(`cluster.CAMPAIGN_SECONDS`), and is published once unless a leader dies in
the instant between its publish and the next mark.
"""

from __future__ import annotations

import asyncio
from functools import partial

import sqlite_utils

from provisiond.cluster import Cluster
from provisiond.errors import StoreUnavailable
from provisiond.logs import get_logger
from provisiond.presence import table as p
from provisiond.presence import tracker
from provisiond.presence.table import Row
from provisiond.presence.tracker import Presence, _Dev
from provisiond.runtime.app import App

log = get_logger("provisiond.presence")

# A heartbeat waits at most this long in memory before the store (and the
# leader) can see it; a device's deadline is seconds after its heartbeat.
FLUSH_SECONDS = 0.2
SWEEP_SECONDS = 0.25
# Other daemons' heartbeats are read back into `last_seen` every this many
# sweeps, with this much overlap: another daemon's flush (every FLUSH_SECONDS)
# may land after rows with later heartbeats were already read. Each read
# returns every device heard from in the window, so it is kept infrequent.
SEEN_EVERY_SWEEPS = 4
SEEN_OVERLAP_SECONDS = 0.5


class SharedPresence(Presence):
    """Presence of a fleet whose device topics are shared by several daemons."""

    def __init__(self, app: App, cluster: Cluster) -> None:
        super().__init__(app)
        self._cluster = cluster
        self._beats: dict[int, tuple[float, float]] = {}  # device → (deadline, seen), wall clock
        self._wills: dict[int, float] = {}
        self._reports: list[tuple[int, str, bool]] = []
        self._marks: list[tuple[int, int]] = []  # published (device, revision)
        self._revs: dict[int, int] = {}  # leader: the revision each queued publish carries
        self._rev = 0
        self._leading = False
        self._seen = 0.0  # the latest `last_seen` read back from the store

    # --- intake (every daemon): remember, the flush writes

    def _beat(self, device_id: int, dev: _Dev, now_m: float, now_w: float, interval: float) -> None:
        self._wills.pop(device_id, None)
        seen = self._beats.get(device_id)
        if seen is None or seen[1] <= now_w:  # the newest heartbeat sets the deadline
            self._beats[device_id] = (now_w + interval * self._factor, now_w)

    def _will(self, device_id: int, dev: _Dev) -> None:
        self._beats.pop(device_id, None)
        self._wills[device_id] = self._clock.now()

    def set_channel(self, device_id: int, channel: str, online: bool) -> bool:
        tracker.check_channel(channel)
        if device_id not in self._devices:
            return False
        self._reports.append((device_id, channel, online))
        return True

    def device_removed(self, device_id: int) -> None:
        super().device_removed(device_id)
        self._beats.pop(device_id, None)
        self._wills.pop(device_id, None)
        self._revs.pop(device_id, None)

    async def flush(self) -> None:
        """Write the heartbeats, wills and channel reports received, and the publishes done."""
        if not (self._beats or self._wills or self._reports or self._marks):
            return
        beats, self._beats = self._beats, {}
        wills, self._wills = self._wills, {}
        reports, self._reports = self._reports, []
        marks, self._marks = self._marks, []
        try:
            await self._app.store.write(
                partial(
                    _record,
                    beats=[(d, deadline, seen) for d, (deadline, seen) in beats.items()],
                    wills=list(wills.items()),
                    reports=reports,
                    marks=marks,
                )
            )
            self._counters["presence.flush.rows"] += len(beats) + len(wills) + len(reports)
        except StoreUnavailable as exc:
            for device_id, seen in beats.items():
                self._beats.setdefault(device_id, seen)
            for device_id, at in wills.items():
                self._wills.setdefault(device_id, at)
            self._reports[:0] = reports
            self._marks[:0] = marks
            self._counters["presence.flush.failed"] += 1
            log.warning("presence.flush_failed", error=str(exc), rows=len(beats) + len(wills))

    # --- start, and the loops

    async def start(self) -> None:
        self._rev, rows = await self._app.store.call(p.load_shared)
        for row in rows:
            dev = self._devices[row.device_id] = _Dev()
            self._set(row, dev)
        self._seen = max((row.last_seen or 0.0 for row in rows), default=0.0)
        log.info("presence.loaded", tracked=len(self._devices), online=self._online, shared=True)
        app = self._app
        app.spawn(self._flush_loop(), name="presence-flush")
        app.spawn(self._sweep_loop(), name="presence-sweep")
        for n in range(tracker.PUBLISHERS):
            app.spawn(self._publish_loop(), name=f"presence-publish-{n}")
        app.spawn(self._lookup_loop(), name="presence-lookup")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def _sweep_loop(self) -> None:
        sweeps = 0
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            sweeps += 1
            try:
                if not self._cluster.is_leader:
                    self._leading = False
                    await self._follow()
                else:
                    if not self._leading:
                        await self._take_over()
                    await self._decide()
                if sweeps % SEEN_EVERY_SWEEPS == 0:
                    await self._read_seen()
            except StoreUnavailable as exc:
                self._counters["presence.sweep.failed"] += 1
                log.warning("presence.sweep_failed", error=str(exc))

    async def _take_over(self) -> None:
        """Newly the leader: catch up, then publish what the last leader may not have."""
        await self._follow()
        for device_id, rev in await self._app.store.call(p.unpublished):
            if device_id in self._devices:
                self._queue(device_id, rev)
        self._leading = True
        log.info("presence.leading", unpublished=len(self._revs))

    async def _decide(self) -> None:
        await self.flush()  # this daemon's own heartbeats count as well
        now = self._clock.now()
        if not await self._app.store.call(partial(p.due, now=now)):
            return
        rev, rows = await self._app.store.write(partial(p.decide, now=now))
        self._rev = max(self._rev, rev)
        for row in rows:
            self._apply(row, leading=True)
            self._queue(row.device_id, rev)

    async def _follow(self) -> None:
        self._rev, rows = await self._app.store.call(partial(p.changed_since, rev=self._rev))
        for row in rows:
            self._apply(row, leading=False)

    async def _read_seen(self) -> None:
        """Every daemon's heartbeats into this daemon's `last_seen` (what `device/get` shows)."""
        seen = await self._app.store.call(
            partial(p.seen_since, since=self._seen - SEEN_OVERLAP_SECONDS)
        )
        devices = self._devices
        for device_id, last_seen in seen:
            dev = devices.get(device_id)
            if dev is not None and (dev.last_seen is None or dev.last_seen < last_seen):
                dev.last_seen = last_seen
            self._seen = max(self._seen, last_seen)

    # --- the view

    def _set(self, row: Row, dev: _Dev) -> bool:
        """Take `row` into the view; True when the device went online or offline."""
        device_id = row.device_id
        was = dev.mqtt or device_id in self._extra
        dev.mqtt, dev.since = row.mqtt, row.since
        if row.last_seen is not None and (dev.last_seen is None or dev.last_seen < row.last_seen):
            dev.last_seen = row.last_seen
        if row.extra:
            self._extra[device_id] = set(row.extra)
        else:
            self._extra.pop(device_id, None)
        online = bool(row.channels)
        if online != was:
            self._online += 1 if online else -1
        return online != was

    def _apply(self, row: Row, *, leading: bool) -> None:
        dev = self._devices.get(row.device_id)
        if dev is None:  # activated through another daemon
            dev = self._devices[row.device_id] = _Dev()
        flipped = self._set(row, dev)
        if flipped and leading:
            online = bool(row.channels)
            self._counters["presence.went_online" if online else "presence.went_offline"] += 1
            log.info("presence.changed", device=row.device_id, online=online, channels=row.channels)
        for listener in self._listeners:
            try:
                listener(row.device_id)
            except Exception:
                log.exception("presence.listener_failed", device=row.device_id)

    def _queue(self, device_id: int, rev: int) -> None:
        self._revs[device_id] = rev
        self._outbox[device_id] = None
        self._outbox_wake.set()

    async def _publish(self, device_id: int) -> None:
        rev = self._revs.get(device_id)
        await super()._publish(device_id)
        if rev is not None and self._revs.get(device_id) == rev:
            del self._revs[device_id]
            self._marks.append((device_id, rev))


def _record(
    db: sqlite_utils.Database,
    *,
    beats: list[tuple[int, float, float]],
    wills: list[tuple[int, float]],
    reports: list[tuple[int, str, bool]],
    marks: list[tuple[int, int]],
) -> None:
    p.record_beats(db, beats, wills)
    p.record_channels(db, reports)
    p.mark_published(db, marks)
