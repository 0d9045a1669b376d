"""Request slots shared fairly between callers.

The router runs at most `capacity` requests at once. Waiters are grouped by
caller (their API key, or one group for requests without one) and served
round-robin: a caller with a thousand requests waiting gets one slot per
turn, like a caller with one. A caller also holds at most `per_caller`
slots at once, so its own requests never fill the event loop's queue ahead
of everybody else's (`limits.max_inflight_per_key`, docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class FairSlots:
    def __init__(self, capacity: int, per_caller: int) -> None:
        self._free = capacity
        self._per_caller = max(1, min(per_caller, capacity))
        self._held: dict[str, int] = {}
        # Callers with waiters, in turn order (a served caller goes to the back).
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def configure(self, per_caller: int) -> None:
        """A new per-caller share (SIGHUP); the capacity needs a restart."""
        self._per_caller = max(1, per_caller)
        self._wake()

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @contextlib.asynccontextmanager
    async def slot(self, caller: str) -> AsyncIterator[None]:
        await self.acquire(caller)
        try:
            yield
        finally:
            self.release(caller)

    async def acquire(self, caller: str) -> None:
        if not self._waiting and self._free > 0 and self._held.get(caller, 0) < self._per_caller:
            self._take(caller)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(caller, deque()).append(future)
        self._wake()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted just as we were cancelled: give it to the next one.
                self.release(caller)
            else:
                self._forget(caller, future)
            raise

    def release(self, caller: str) -> None:
        held = self._held[caller] - 1
        if held:
            self._held[caller] = held
        else:
            del self._held[caller]
        self._free += 1
        self._wake()

    def _take(self, caller: str) -> None:
        self._held[caller] = self._held.get(caller, 0) + 1
        self._free -= 1

    def _wake(self) -> None:
        while self._free > 0 and self._waiting:
            for caller in list(self._waiting):
                if self._held.get(caller, 0) < self._per_caller:
                    break
            else:
                return  # everyone waiting already holds their share
            queue = self._waiting.pop(caller)
            future = queue.popleft()
            if queue:
                self._waiting[caller] = queue  # to the back of the turn order
            if future.done():
                continue  # cancelled; its task is on its way out
            self._take(caller)
            future.set_result(None)

    def _forget(self, caller: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(caller)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(future)
        if not queue:
            del self._waiting[caller]
