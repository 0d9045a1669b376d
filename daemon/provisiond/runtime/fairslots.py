"""Request slots shared fairly between callers.

The router runs at most `capacity` requests at once. Waiters are grouped by
caller (their API key, or one group for requests without one) and served
round-robin: a caller with a thousand requests waiting gets one slot per
turn, like a caller with one. A caller also holds at most `per_caller`
slots at once, so its own requests never fill the event loop's queue ahead
of everybody else's (`limits.max_inflight_per_key`, docs/protocol.md).

While another caller is active (it held or asked for a slot within the last
`ACTIVE_SECONDS`), the bound is `shared`, smaller
(`limits.shared_inflight_per_key`): a flood's requests then come back from
the store in smaller bursts, and another caller's request waits behind fewer
of them on the event loop. A caller alone keeps `per_caller`, so a busy
service with the daemon to itself loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

# A caller that held or asked for a slot this recently counts as active.
ACTIVE_SECONDS = 1.0


class FairSlots:
    def __init__(
        self,
        capacity: int,
        per_caller: int,
        shared: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = capacity
        self._capacity = capacity
        self._clock = clock
        self._held: dict[str, int] = {}
        # Callers with waiters, in turn order (a served caller goes to the back).
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        # When each caller last held or asked for a slot.
        self._seen: dict[str, float] = {}
        self._per_caller = self._shared = 1
        self.configure(per_caller, shared)

    def configure(self, per_caller: int, shared: int | None = None) -> None:
        """New shares (SIGHUP); the capacity needs a restart. `shared` None: as `per_caller`."""
        self._per_caller = max(1, min(per_caller, self._capacity))
        self._shared = self._per_caller if shared is None else max(1, min(shared, self._per_caller))
        self._wake()

    def bound(self, caller: str) -> int:
        """How many slots `caller` may hold now: `shared` while another caller is active."""
        return self._bound(caller, self._active())

    def _active(self) -> set[str] | None:
        """The callers active now; None when both bounds are the same (nothing to tell)."""
        if self._shared == self._per_caller:
            return None
        cutoff = self._clock() - ACTIVE_SECONDS
        return {
            c for c, t in self._seen.items() if t > cutoff or c in self._held or c in self._waiting
        }

    def _bound(self, caller: str, active: set[str] | None) -> int:
        if active is not None and len(active) > (caller in active):
            return self._shared
        return self._per_caller

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
        self._note(caller)
        if not self._waiting and self._free > 0 and self._held.get(caller, 0) < self.bound(caller):
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

    def _note(self, caller: str) -> None:
        now = self._clock()
        self._seen[caller] = now
        if len(self._seen) > 2 * (len(self._held) + len(self._waiting)) + 16:
            # Forget callers long gone, so that the scan in `_active` stays short.
            cutoff = now - ACTIVE_SECONDS
            self._seen = {
                c: t
                for c, t in self._seen.items()
                if t > cutoff or c in self._held or c in self._waiting
            }

    def _take(self, caller: str) -> None:
        self._held[caller] = self._held.get(caller, 0) + 1
        self._free -= 1

    def _wake(self) -> None:
        # Once per wake, not per waiting caller: who is active does not change here.
        active = self._active()
        while self._free > 0 and self._waiting:
            for caller in list(self._waiting):
                if self._held.get(caller, 0) < self._bound(caller, active):
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
