"""What a SIGHUP may change: the new config minus the keys only a restart can apply."""

from __future__ import annotations

from typing import Any

from provisiond.config import Config

# The broker session, the database and the router's concurrency bound are
# fixed for the life of the process; a reload keeps their running values.
RESTART_ONLY = ("mqtt", "store", "daemon.max_concurrent_requests")


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the restart-only keys of `old`, and the names of those that differed."""
    pinned = [
        key
        for key in changed_keys(old, new)
        if any(key == r or key.startswith(r + ".") for r in RESTART_ONLY)
    ]
    kept = new.model_copy(
        update={
            "mqtt": old.mqtt,
            "store": old.store,
            "daemon": new.daemon.model_copy(
                update={"max_concurrent_requests": old.daemon.max_concurrent_requests}
            ),
        }
    )
    return kept, pinned


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted names of the keys whose values differ (names only: values may be secrets' paths)."""
    old_flat, new_flat = _flatten(old.model_dump()), _flatten(new.model_dump())
    return sorted(
        k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k)
    )


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, name + "."))
        else:
            flat[name] = item
    return flat
