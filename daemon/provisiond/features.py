"""The features the daemon runs, in start order. Each registers itself on the App."""

from __future__ import annotations

from collections.abc import Callable

from provisiond import metrics, presence
from provisiond.app import App
from provisiond.ops import commands as command_ops
from provisiond.ops import daemon, keys, provision, wifi
from provisiond.ops import devices as device_ops
from provisiond.rpc import Router

Setup = Callable[[App, Router], None]

FEATURES: list[Setup] = [
    keys.setup,
    daemon.setup,
    wifi.setup,
    provision.setup,
    device_ops.setup,
    presence.setup,
    command_ops.setup,
    metrics.setup,
]
