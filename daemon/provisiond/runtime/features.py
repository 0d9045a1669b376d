"""The features the daemon runs, in start order, and what each needs from the others.

Each `Feature` names the services it provides and the ones it needs:
`requires` must be provided by a feature set up before it; `uses` is taken
when present (the feature works without it), but if a later feature
provides it, that is a mistake in the order, not an absence. `check` runs
before any setup and refuses the list with a message naming both features,
so a misordered list fails at start instead of quietly misbehaving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from provisiond import cluster, metrics
from provisiond.broker_accounts import feature as broker_accounts
from provisiond.broker_accounts.feature import BROKER_ACCOUNTS
from provisiond.cluster import CLUSTER
from provisiond.ops import commands, daemon, decommission, devices, keys, provision, wifi
from provisiond.presence import PRESENCE
from provisiond.presence import feature as presence
from provisiond.rpc import Router
from provisiond.runtime.app import App
from provisiond.runtime.services import FeatureError, ServiceKey
from provisiond.wifi.service import GRANTS

Setup = Callable[[App, Router], None]


@dataclass(frozen=True)
class Feature:
    name: str
    setup: Setup
    provides: tuple[ServiceKey[object], ...] = ()
    requires: tuple[ServiceKey[object], ...] = ()
    uses: tuple[ServiceKey[object], ...] = ()


def check(features: Sequence[Feature]) -> None:
    """Refuse a list where a feature needs a service not provided before it."""
    provider: dict[ServiceKey[object], Feature] = {}
    for feature in features:
        for key in feature.provides:
            if key in provider:
                raise FeatureError(
                    f"features {provider[key].name!r} and {feature.name!r} both provide {key.name}"
                )
            provider[key] = feature
    ready: set[ServiceKey[object]] = set()
    for feature in features:
        for key in (*feature.requires, *feature.uses):
            source = provider.get(key)
            if source is None and key in feature.requires:
                raise FeatureError(
                    f"feature {feature.name!r} requires {key.name}, which no feature provides"
                )
            if source is not None and key not in ready:
                raise FeatureError(
                    f"feature {feature.name!r} needs {key.name} from feature {source.name!r},"
                    f" which is set up after it: put {source.name!r} before {feature.name!r}"
                )
        ready.update(feature.provides)


def set_up(features: Sequence[Feature], app: App, router: Router) -> None:
    """Check the list, then set each feature up; each must provide what it declares."""
    check(features)
    for feature in features:
        feature.setup(app, router)
        for key in feature.provides:
            if key not in app.services:
                raise FeatureError(f"feature {feature.name!r} did not provide {key.name}")


FEATURES: list[Feature] = [
    Feature("keys", keys.setup),
    Feature("cluster", cluster.setup, provides=(CLUSTER,)),
    Feature("presence", presence.setup, provides=(PRESENCE,), requires=(CLUSTER,)),
    Feature("wifi", wifi.setup, provides=(GRANTS,)),
    Feature("daemon", daemon.setup),
    Feature("broker_accounts", broker_accounts.setup, provides=(BROKER_ACCOUNTS,)),
    Feature("provision", provision.setup, uses=(PRESENCE, GRANTS, BROKER_ACCOUNTS)),
    Feature("devices", devices.setup, uses=(PRESENCE,)),
    Feature("commands", commands.setup, requires=(PRESENCE, CLUSTER)),
    Feature("decommission", decommission.setup, uses=(BROKER_ACCOUNTS, PRESENCE)),
    Feature("metrics", metrics.setup, uses=(PRESENCE,)),
]
