"""The features the daemon runs, in start order. Each registers itself on the App."""

from __future__ import annotations

from collections.abc import Callable

from provisiond.app import App
from provisiond.ops import daemon, keys
from provisiond.rpc import Router

Setup = Callable[[App, Router], None]

FEATURES: list[Setup] = [
    keys.setup,
    daemon.setup,
]
