"""The features the daemon runs, in start order. Each registers itself on the App."""

from __future__ import annotations

from collections.abc import Callable

from provisiond import decommission, presence
from provisiond.app import App
from provisiond.broker_accounts import feature as broker_accounts
from provisiond.ops import commands as command_ops
from provisiond.ops import daemon, keys, provision, wifi
from provisiond.ops import devices as device_ops
from provisiond.rpc import Router

Setup = Callable[[App, Router], None]

FEATURES: list[Setup] = [
    keys.setup,
    broker_accounts.setup,
    daemon.setup,
    wifi.setup,
    provision.setup,
    device_ops.setup,
    presence.setup,
    command_ops.setup,
    decommission.setup,
]
