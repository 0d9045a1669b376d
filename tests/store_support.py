"""Helpers for the store's own tests (group commit, dialects)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from provisiond.store import Store


@contextlib.asynccontextmanager
async def held(store: Store) -> AsyncIterator[None]:
    """Keep the store thread busy until the block ends, so writes queue up behind it."""
    release = threading.Event()
    busy = asyncio.ensure_future(store.call(lambda _db: release.wait(10)))
    await asyncio.sleep(0.05)
    try:
        yield
    finally:
        release.set()
        await busy
