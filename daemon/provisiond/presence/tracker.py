"""Device presence from heartbeats, last wills and plugin-reported channels (docs/protocol.md §6).

Built for fleets of 100k devices on one gateway, which shapes everything here:

- Heartbeats take a synchronous fast path: no await, no store access, no
  allocation beyond the device's own small record for a known device.
- Every `mqtt` deadline lives in ONE heap, fired by ONE task. A device has at
  most one live heap entry: a heartbeat that pushes the deadline later only
  updates the record, and the stale entry re-schedules itself when it pops.
- The store sees presence in batches (`flush`, once a second, one
  `executemany`), never one write per heartbeat.
- Ids that are not active devices are resolved against the store at most
  once per id and TTL, in batches, with bounded queues and a bounded negative
  cache, so a flood of garbage costs counters, not memory or store load.

See docs/presence-and-commands.md for the semantics operators rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from provisiond import devices
from provisiond.clock import iso_utc_or_none
from provisiond.config import Config, PresenceConfig
from provisiond.errors import StoreUnavailable
from provisiond.logs import get_logger
from provisiond.payloads import json_object
from provisiond.presence import table
from provisiond.presence.table import LOOKUP_CHUNK, MQTT
from provisiond.runtime.app import App
from provisiond.runtime.services import ServiceKey
from provisiond.transport import Delivery, NotConnected, PublishRefused

log = get_logger("provisiond.presence")

MAX_HEARTBEAT_BYTES = 4096
MAX_CHANNEL_NAME = 32
# Longest sleep of the expiry task: bounds lateness when the heap changed
# under it, and lets an injected test clock be noticed.
TICK_SECONDS = 0.25
FLUSH_SECONDS = 1.0
# Unknown ids: at most this many awaiting a store lookup (more are dropped and
# counted; a real device heartbeats again), looked up this many per query.
LOOKUP_MAX_PENDING = 1024
# Unknown ids are gathered this long before one query: a flood of them costs
# the store at most 1/LOOKUP_PAUSE_SECONDS queries a second.
LOOKUP_PAUSE_SECONDS = 0.05
# A negative answer is trusted this long, for at most this many ids (FIFO).
NEGATIVE_TTL_SECONDS = 10.0
NEGATIVE_MAX = 4096
# Concurrent presence publishers, each with one QoS 1 publish in flight at a
# time: mosquitto's default in-flight window (its Receive Maximum) is 20, and
# more publishers than the window would only queue for it.
PUBLISHERS = 16
# Device ids are positive SQLite integers; longer digit strings are garbage.
MAX_ID_DIGITS = 18


Listener = Callable[[int], None]


class _Dev:
    """One active device. Kept tiny: there may be 100k of these."""

    __slots__ = ("deadline", "last_seen", "mqtt", "queued", "since")

    def __init__(self) -> None:
        self.deadline = 0.0  # monotonic; meaningful while `mqtt` is True
        self.queued: float | None = None  # time of this device's live heap entry
        self.last_seen: float | None = None  # wall clock
        self.since: float | None = None  # wall clock of the last online/offline flip
        self.mqtt = False


def parse_device_id(raw: str) -> int | None:
    """The id in a device topic, only in its canonical decimal form.

    `P/devices/007/...` is not device 7's topic (the broker ACL grants device 7
    exactly `P/devices/7/#`), so leading zeros, signs and non-ASCII digits are
    refused rather than normalised.
    """
    if not raw or len(raw) > MAX_ID_DIGITS or not raw.isascii() or not raw.isdigit():
        return None
    if raw[0] == "0":
        return None
    return int(raw)


def check_channel(channel: str) -> None:
    """A plugin channel's name: ValueError for the reserved `mqtt` or a bad length."""
    if channel == MQTT or not channel or len(channel) > MAX_CHANNEL_NAME:
        raise ValueError(f"channel must be 1..{MAX_CHANNEL_NAME} characters and not {MQTT!r}")


class RateLimitedLog:
    """Debug lines that a flood of bad input cannot turn into a flood of logs."""

    def __init__(self, every_seconds: float = 10.0) -> None:
        self._every = every_seconds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -math.inf) < self._every:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        suppressed = self._suppressed.pop(event, 0)
        log.debug(event, suppressed=suppressed, **fields)


class Presence:
    """Presence of every active device; the one writer of the `presence` table."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._clock = app.clock
        self._counters = app.counters
        self._configure(app.config.presence)
        self._devices: dict[int, _Dev] = {}
        # Non-mqtt channels currently online, only for devices that have any.
        self._extra: dict[int, set[str]] = {}
        self._heap: list[tuple[float, int]] = []
        self._dirty: set[int] = set()
        # Devices whose presence must be (re)published; insertion-ordered, so
        # rapid flips of one device coalesce into one publish of its latest state.
        self._outbox: dict[int, None] = {}
        self._outbox_wake = asyncio.Event()
        self._publishing = 0
        self._idle = asyncio.Event()  # set while nothing is waiting to be published
        self._negative: dict[int, float] = {}
        self._pending: dict[int, tuple[float, float]] = {}
        self._lookup_wake = asyncio.Event()
        self._listeners: list[Listener] = []
        self._online = 0
        self._debug = RateLimitedLog()
        self.lateness: list[float] = []  # seconds past the deadline at which expiry fired (bench)
        self.record_lateness = False

    def _configure(self, cfg: PresenceConfig) -> None:
        self._min_interval = cfg.min_interval_seconds
        self._max_interval = max(cfg.max_interval_seconds, cfg.min_interval_seconds)
        self._factor = cfg.timeout_factor
        self._default_interval = self._clamp(cfg.heartbeat_interval_seconds)

    async def reload(self, config: Config) -> None:
        """New intervals apply from each device's next heartbeat; deadlines already set stand."""
        self._configure(config.presence)

    # --- public API (other features and plugins)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(device_id)` synchronously after every presence change."""
        self._listeners.append(listener)

    def is_offline(self, device_id: int) -> bool:
        """`deviceIsOffline`: true when no channel is online (or the device is unknown)."""
        dev = self._devices.get(device_id)
        return dev is None or not (dev.mqtt or device_id in self._extra)

    def mqtt_online(self, device_id: int) -> bool:
        dev = self._devices.get(device_id)
        return dev is not None and dev.mqtt

    def presence_of(self, device_id: int) -> dict[str, Any] | None:
        """The presence document of an active device; None for any other id."""
        dev = self._devices.get(device_id)
        if dev is None:
            return None
        channels = self._channels(device_id, dev)
        return {
            "online": bool(channels),
            "channels": channels,
            "last_seen": iso_utc_or_none(dev.last_seen),
            "since": iso_utc_or_none(dev.since),
        }

    def set_channel(self, device_id: int, channel: str, online: bool) -> bool:
        """A plugin reports a non-MQTT channel (e.g. `ble`) up or down.

        Returns False (and changes nothing) for a device that is not active.
        Plugin channels have no deadline: the plugin reports them down itself.
        """
        check_channel(channel)
        dev = self._devices.get(device_id)
        if dev is None:
            return False
        extra = self._extra.get(device_id)
        if online == (extra is not None and channel in extra):
            return True
        was = dev.mqtt or extra is not None
        if online:
            self._extra.setdefault(device_id, set()).add(channel)
        else:
            assert extra is not None
            extra.discard(channel)
            if not extra:
                del self._extra[device_id]
        self._changed(device_id, dev, was, self._clock.now())
        return True

    def device_activated(self, device_id: int) -> None:
        """Track a device activated just now, sparing its first heartbeat a store lookup."""
        self._negative.pop(device_id, None)
        self._devices.setdefault(device_id, _Dev())

    def device_removed(self, device_id: int) -> None:
        """A decommissioned device: no longer tracked, published or saved (its row is deleted)."""
        dev = self._devices.pop(device_id, None)
        if dev is not None and (dev.mqtt or device_id in self._extra):
            self._online -= 1
        self._extra.pop(device_id, None)
        self._outbox.pop(device_id, None)
        self._dirty.discard(device_id)
        self._pending.pop(device_id, None)
        # Its heap entry finds no record when it pops, and is skipped.

    # --- topic handlers (sync fast path)

    def on_heartbeat(self, delivery: Delivery, values: list[str]) -> None:
        self.heartbeat(values[0], delivery.payload)

    def heartbeat(self, raw_id: str, payload: bytes) -> None:
        counters = self._counters
        counters["presence.heartbeats"] += 1
        if len(payload) > MAX_HEARTBEAT_BYTES:
            counters["presence.heartbeats.oversize"] += 1
            self._debug("presence.heartbeat_oversize", device=raw_id[:24], bytes=len(payload))
            return
        interval = self._default_interval if not payload else self._interval_hint(payload)
        device_id = parse_device_id(raw_id)
        if interval is None or device_id is None:
            counters["presence.heartbeats.malformed"] += 1
            self._debug("presence.heartbeat_malformed", device=raw_id[:24])
            return
        now_m = self._clock.monotonic()
        dev = self._devices.get(device_id)
        if dev is None:
            self._unknown(device_id, now_m, interval)
            return
        self._beat(device_id, dev, now_m, self._clock.now(), interval)

    def on_status(self, delivery: Delivery, values: list[str]) -> None:
        payload = delivery.payload.strip()
        device_id = parse_device_id(values[0])
        if payload not in (b"online", b"offline") or device_id is None:
            self._counters["presence.status.malformed"] += 1
            self._debug("presence.status_malformed", device=values[0][:24])
            return
        online = payload == b"online"
        if online and delivery.retain:
            # A retained `online` was true when published, perhaps long ago; only
            # fresh messages prove a device is there. A retained `offline` (the
            # will) is still the latest word, so it is applied.
            self._counters["presence.status.retained_online_ignored"] += 1
            return
        self._counters[f"presence.status.{payload.decode()}"] += 1
        now_m = self._clock.monotonic()
        dev = self._devices.get(device_id)
        if dev is None:
            if online:
                self._unknown(device_id, now_m, self._default_interval)
            else:
                self._counters["presence.status.unknown"] += 1
            return
        if online:
            self._beat(device_id, dev, now_m, self._clock.now(), self._default_interval)
        else:
            self._will(device_id, dev)

    def _will(self, device_id: int, dev: _Dev) -> None:
        """The device's `offline` (its last will, or said on purpose): MQTT is down now."""
        if dev.mqtt:
            dev.mqtt = False
            self._changed(device_id, dev, True, self._clock.now())

    # --- internals

    def _clamp(self, interval: float) -> float:
        return float(min(max(interval, self._min_interval), self._max_interval))

    def _interval_hint(self, payload: bytes) -> float | None:
        """The heartbeat's interval, clamped; None when the payload is malformed."""
        doc = json_object(payload)
        if doc is None:
            return None
        hint = doc.get("interval")
        if hint is None:
            return self._default_interval
        if isinstance(hint, bool) or not isinstance(hint, int | float) or not 0 < hint < math.inf:
            return None
        return self._clamp(hint)

    def _beat(self, device_id: int, dev: _Dev, now_m: float, now_w: float, interval: float) -> None:
        deadline = now_m + interval * self._factor
        dev.deadline = deadline
        dev.last_seen = now_w
        queued = dev.queued
        if queued is None or deadline < queued:
            dev.queued = deadline
            heapq.heappush(self._heap, (deadline, device_id))
        self._dirty.add(device_id)
        if not dev.mqtt:
            was = device_id in self._extra
            dev.mqtt = True
            self._changed(device_id, dev, was, now_w)

    def _changed(self, device_id: int, dev: _Dev, was_online: bool, at: float) -> None:
        """Record a change of the device's channels; publish and notify."""
        online = dev.mqtt or device_id in self._extra
        if online != was_online:
            dev.since = at
            self._online += 1 if online else -1
            self._counters["presence.went_online" if online else "presence.went_offline"] += 1
            # Operators read device comings and goings in the journal; in steady
            # operation these are rare next to heartbeats, which are never logged.
            log.info(
                "presence.changed",
                device=device_id,
                online=online,
                channels=self._channels(device_id, dev),
            )
        self._dirty.add(device_id)
        self._outbox[device_id] = None
        self._outbox_wake.set()
        for listener in self._listeners:
            try:
                listener(device_id)
            except Exception:
                log.exception("presence.listener_failed", device=device_id)

    def _channels(self, device_id: int, dev: _Dev) -> list[str]:
        extra = self._extra.get(device_id)
        channels = [MQTT] if dev.mqtt else []
        if extra:
            channels.extend(sorted(extra))
        return channels

    def _unknown(self, device_id: int, now_m: float, interval: float) -> None:
        negative = self._negative
        expires = negative.get(device_id)
        if expires is not None:
            if expires > now_m:
                self._counters["presence.heartbeats.unknown"] += 1
                self._debug("presence.heartbeat_unknown", device=device_id)
                return
            del negative[device_id]
        pending = self._pending
        if device_id in pending or len(pending) < LOOKUP_MAX_PENDING:
            pending[device_id] = (now_m, interval)
            self._lookup_wake.set()
        else:
            self._counters["presence.heartbeats.lookup_overflow"] += 1
            self._debug("presence.lookup_overflow", device=device_id)

    # --- background tasks

    async def start(self) -> None:
        rows = await self._app.store.call(table.load)
        now_m, now_w = self._clock.monotonic(), self._clock.now()
        for device_id, online, last_seen, since, deadline in rows:
            dev = _Dev()
            dev.last_seen, dev.since = last_seen, since
            if deadline is not None and deadline > now_w:
                dev.mqtt = True
                dev.deadline = dev.queued = now_m + (deadline - now_w)
                self._heap.append((dev.deadline, device_id))
                self._online += 1
            elif online:
                # Its deadline passed while the daemon was down (or only plugin
                # channels held it, and plugins re-report after a restart).
                dev.since = deadline if deadline is not None else now_w
                self._dirty.add(device_id)
                self._outbox[device_id] = None
            self._devices[device_id] = dev
        heapq.heapify(self._heap)
        log.info("presence.loaded", tracked=len(self._devices), online=self._online)
        app = self._app
        app.spawn(self._expiry_loop(), name="presence-expiry")
        app.spawn(self._flush_loop(), name="presence-flush")
        for n in range(PUBLISHERS):
            app.spawn(self._publish_loop(), name=f"presence-publish-{n}")
        app.spawn(self._lookup_loop(), name="presence-lookup")
        if self._outbox:
            self._outbox_wake.set()

    async def stop(self) -> None:
        """Publish what is pending while the broker is still there, then save."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), timeout=3.0)
        await self.flush()

    async def _drain(self) -> None:
        if (self._outbox or self._publishing) and self._app.transport.is_connected:
            self._idle.clear()
            await self._idle.wait()

    async def _expiry_loop(self) -> None:
        heap, devices, clock = self._heap, self._devices, self._clock
        while True:
            now = clock.monotonic()
            fired = 0
            while heap and heap[0][0] <= now:
                at, device_id = heapq.heappop(heap)
                dev = devices.get(device_id)
                if dev is None or dev.queued != at:
                    continue  # superseded by an earlier entry for the same device
                dev.queued = None
                if not dev.mqtt:
                    continue
                if dev.deadline > now:
                    dev.queued = dev.deadline
                    heapq.heappush(heap, (dev.deadline, device_id))
                    continue
                if self.record_lateness:
                    self.lateness.append(now - dev.deadline)
                dev.mqtt = False
                since = clock.now() - (now - dev.deadline)
                self._changed(device_id, dev, True, since)
                fired += 1
                if fired % 2000 == 0:
                    await asyncio.sleep(0)  # let heartbeats in during a mass expiry
                    now = clock.monotonic()
            delay = heap[0][0] - now if heap else TICK_SECONDS
            await asyncio.sleep(min(max(delay, 0.0), TICK_SECONDS))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Write every changed device in one transaction."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        now_m, now_w = self._clock.monotonic(), self._clock.now()
        rows: list[tuple[Any, ...]] = []
        for device_id in dirty:
            dev = self._devices.get(device_id)
            if dev is None:
                continue
            channels = self._channels(device_id, dev)
            deadline = now_w + (dev.deadline - now_m) if dev.mqtt else None
            rows.append(
                (
                    device_id,
                    int(bool(channels)),
                    json.dumps(channels),
                    dev.last_seen,
                    dev.since,
                    deadline,
                    int(dev.mqtt),
                )
            )
            if len(rows) % 5000 == 0:
                await asyncio.sleep(0)
        try:
            await self._app.store.write(partial(table.save, rows=rows))
            self._counters["presence.flush.rows"] += len(rows)
        except StoreUnavailable as exc:
            self._dirty |= dirty
            self._counters["presence.flush.failed"] += 1
            log.warning("presence.flush_failed", error=str(exc), rows=len(rows))

    async def _publish_loop(self) -> None:
        """One of PUBLISHERS workers: publish the oldest pending change, repeat.

        A few workers keep several QoS 1 publishes in flight (each waits for
        its PUBACK) without flooding the client's pending-call queue.
        """
        transport = self._app.transport
        outbox = self._outbox
        while True:
            if not outbox:
                self._outbox_wake.clear()
                await self._outbox_wake.wait()
                continue
            await transport.connected.wait()
            if not outbox:
                continue
            device_id = next(iter(outbox))
            del outbox[device_id]
            self._publishing += 1
            try:
                await self._publish(device_id)
            except NotConnected:
                outbox.setdefault(device_id, None)  # again once reconnected
                # A lost connection can fail publish before any await, while
                # `connected` is still set: without yielding here, the transport
                # never runs to clear it and this loop spins (seen when the
                # broker was killed under the demo: 100% CPU, memory growing).
                await asyncio.sleep(0.05)
            except PublishRefused as exc:
                # Not retried: the broker's ACL would refuse it again at once.
                log.error("presence.publish_refused", device=device_id, reason=str(exc))
            except Exception:
                log.exception("presence.publish_failed", device=device_id)
            finally:
                self._publishing -= 1
                if not outbox and not self._publishing:
                    self._idle.set()

    async def _publish(self, device_id: int) -> None:
        doc = self.presence_of(device_id)
        if doc is None:
            return
        payload = json.dumps(doc, separators=(",", ":")).encode()
        await self._app.transport.publish(
            self._app.topic("devices", device_id, "presence"), payload, qos=1, retain=True
        )
        await self._app.publish_event("presence", {"deviceId": device_id, **doc})

    async def _lookup_loop(self) -> None:
        while True:
            await self._lookup_wake.wait()
            await asyncio.sleep(LOOKUP_PAUSE_SECONDS)
            self._lookup_wake.clear()
            while self._pending:
                batch: dict[int, tuple[float, float]] = {}
                for device_id, seen in self._pending.items():
                    batch[device_id] = seen
                    if len(batch) >= LOOKUP_CHUNK:
                        break
                for device_id in batch:
                    del self._pending[device_id]
                self._counters["presence.lookups"] += 1
                try:
                    active = await self._app.store.call(
                        partial(devices.active_among, ids=list(batch))
                    )
                except StoreUnavailable:
                    self._counters["presence.lookups.failed"] += 1
                    await asyncio.sleep(1.0)
                    continue
                self._resolve(batch, active)
                await asyncio.sleep(LOOKUP_PAUSE_SECONDS)

    def _resolve(self, batch: dict[int, tuple[float, float]], active: set[int]) -> None:
        now_m, now_w = self._clock.monotonic(), self._clock.now()
        negative = self._negative
        for device_id, (seen_m, interval) in batch.items():
            if device_id in active:
                dev = self._devices.setdefault(device_id, _Dev())
                self._beat(device_id, dev, seen_m, now_w - (now_m - seen_m), interval)
                continue
            self._counters["presence.heartbeats.unknown"] += 1
            self._debug("presence.heartbeat_unknown", device=device_id)
            negative.pop(device_id, None)
            negative[device_id] = now_m + NEGATIVE_TTL_SECONDS
            while len(negative) > NEGATIVE_MAX:
                del negative[next(iter(negative))]

    async def stats(self) -> dict[str, Any]:
        counters = self._counters
        return {
            "tracked": len(self._devices),
            "online": self._online,
            "offline": len(self._devices) - self._online,
            "heartbeats": counters["presence.heartbeats"],
            "heartbeats_unknown": counters["presence.heartbeats.unknown"],
            "heartbeats_malformed": counters["presence.heartbeats.malformed"],
            "heartbeats_oversize": counters["presence.heartbeats.oversize"],
            "heartbeats_lookup_overflow": counters["presence.heartbeats.lookup_overflow"],
            "pending_lookups": len(self._pending),
            "negative_cache": len(self._negative),
            "deadlines_queued": len(self._heap),
            "unsaved": len(self._dirty),
            "unpublished": len(self._outbox),
        }


PRESENCE: ServiceKey[Presence] = ServiceKey("presence")
