"""The timestamp spellings every reply shares."""

from __future__ import annotations

from provisiond.clock import iso_utc, iso_utc_or_none


def test_iso_utc_is_second_precision_with_z() -> None:
    assert iso_utc(1_750_000_000.9) == "2025-06-15T15:06:40Z"


def test_iso_utc_or_none_passes_none_through() -> None:
    assert iso_utc_or_none(None) is None
    assert iso_utc_or_none(1_750_000_000) == iso_utc(1_750_000_000)
    # 0 is a timestamp (the epoch), not a missing one.
    assert iso_utc_or_none(0) == "1970-01-01T00:00:00Z"
