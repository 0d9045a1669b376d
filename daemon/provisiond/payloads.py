"""Parsing what devices and callers send: one place that knows every way JSON fails."""

from __future__ import annotations

import json
import re
from typing import Any, Final

# A device's machine reason code ("wrong_password", "ssid_not_found"): what a
# status report may carry, checked on every path a report comes in by.
REASON_CODE: Final = re.compile(r"[a-z0-9_\-]{1,64}")


class NotJson(ValueError):
    """The payload is not JSON (bad syntax, not UTF-8, or nested too deep to parse)."""


def parse_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and UnicodeDecodeError; a deeply
        # nested document ("[[[[…") exhausts the parser's recursion instead.
        raise NotJson(exc.__class__.__name__) from None


def json_object(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object, or None for anything else."""
    try:
        doc = parse_json(payload)
    except NotJson:
        return None
    return doc if isinstance(doc, dict) else None
