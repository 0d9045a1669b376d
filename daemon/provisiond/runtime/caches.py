"""Caches of store rows, and the one watcher that keeps them honest.

The daemon caches API keys (`auth.KeyCache`) and device records
(`devices.DeviceCache`) so a request needs no store trip. Its own writes
clear what they change (`devices.forget`). Writes by another process (the
CLI, a second daemon on the same store) move SQLite's `PRAGMA data_version`;
this watcher polls it every `POLL_SECONDS` and clears both caches when it
moves, so a revocation elsewhere takes effect within one poll.
"""

from __future__ import annotations

import asyncio

from provisiond.auth import KeyCache
from provisiond.devices import DeviceCache
from provisiond.errors import StoreUnavailable
from provisiond.logs import get_logger
from provisiond.store import Store, data_version

log = get_logger("provisiond.runtime.caches")

POLL_SECONDS = 0.2
# A version no store reports: observing it clears every cache.
_UNKNOWN = -1


class StoreCaches:
    """The caches of store rows and the watcher that invalidates them."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.keys = KeyCache()
        self.devices = DeviceCache()

    async def start(self) -> None:
        self.observe(await self._store.call(data_version))

    async def run(self) -> None:
        """Poll the store's data version until cancelled."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                self.observe(await self._store.call(data_version))
            except StoreUnavailable:
                pass
            except Exception:
                # Keep watching: a dead watcher would leave revoked keys cached.
                log.exception("caches.watch_failed")
                self.observe(_UNKNOWN)

    def observe(self, version: int) -> None:
        """Another process committed (or not): drop what it may have changed."""
        self.keys.observe(version)
        self.devices.observe(version)
