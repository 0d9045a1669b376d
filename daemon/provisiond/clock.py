"""Time source, injectable so tests can drive expiry without sleeping."""

from __future__ import annotations

import time


class Clock:
    def now(self) -> float:
        """Wall-clock seconds since the epoch (persisted timestamps)."""
        return time.time()

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (deadlines, durations)."""
        return time.monotonic()


def iso_utc(ts: float) -> str:
    """ISO 8601 in UTC with a `Z` suffix, second precision, as the seed's API shows."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def iso_utc_or_none(ts: float | None) -> str | None:
    """`iso_utc`, passing None through: for timestamps of what has not happened yet."""
    return None if ts is None else iso_utc(ts)
