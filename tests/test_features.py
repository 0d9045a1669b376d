"""Features declare what they need from each other; a wrong list fails at start, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisiond.ops import commands as command_ops
from provisiond.presence import PRESENCE
from provisiond.rpc import Router
from provisiond.runtime.app import App
from provisiond.runtime.features import FEATURES, Feature, check
from provisiond.runtime.services import FeatureError, ServiceKey, Services
from provisiond.server import Server
from support import Broker, make_config


def by_name(name: str) -> Feature:
    return next(f for f in FEATURES if f.name == name)


def test_the_shipped_list_is_in_a_working_order() -> None:
    check(FEATURES)


def test_a_feature_set_up_before_what_it_requires_is_refused_naming_both() -> None:
    # The order that once left every device "offline" and its commands queued forever.
    with pytest.raises(FeatureError) as caught:
        check([by_name("commands"), by_name("presence")])
    message = str(caught.value)
    assert "'commands'" in message and "'presence'" in message
    assert "put 'presence' before 'commands'" in message


def test_an_optional_dependency_provided_too_late_is_an_ordering_mistake() -> None:
    late = [f for f in FEATURES if f.name != "wifi"] + [by_name("wifi")]
    with pytest.raises(FeatureError, match=r"'provision' needs grants from feature 'wifi'"):
        check(late)


def test_a_required_service_nobody_provides_is_refused() -> None:
    with pytest.raises(FeatureError, match=r"'commands' requires presence, which no feature"):
        check([Feature("commands", command_ops.setup, requires=(PRESENCE,))])


def test_an_optional_service_may_be_absent() -> None:
    check([by_name("provision"), by_name("devices")])


def test_two_providers_of_one_service_are_refused() -> None:
    twin = Feature("twin", lambda _app, _router: None, provides=(PRESENCE,))
    with pytest.raises(FeatureError, match="both provide presence"):
        check([by_name("presence"), twin])


def test_services_are_typed_keys_not_strings() -> None:
    key: ServiceKey[list[int]] = ServiceKey("numbers")
    services = Services()
    assert services.find(key) is None
    with pytest.raises(FeatureError, match="no feature provides numbers"):
        services.get(key)
    services.provide(key, [1, 2])
    assert services.get(key) == [1, 2]
    with pytest.raises(FeatureError, match="provided twice"):
        services.provide(key, [3])


@pytest.mark.store
async def test_a_misordered_daemon_does_not_start(tmp_path: Path, broker: Broker) -> None:
    config = make_config(tmp_path, broker)
    swapped = [f for f in FEATURES if f.name != "presence"] + [by_name("presence")]
    server = Server(config, features=swapped)
    with pytest.raises(FeatureError, match="put 'presence' before"):
        await server.serve()
    assert not server.ready.is_set()


@pytest.mark.store
async def test_a_feature_that_does_not_provide_what_it_declares_fails_start(
    tmp_path: Path, broker: Broker
) -> None:
    def forgetful(_app: App, _router: Router) -> None:
        return None

    config = make_config(tmp_path, broker)
    features = [Feature("forgetful", forgetful, provides=(PRESENCE,))]
    with pytest.raises(FeatureError, match="'forgetful' did not provide presence"):
        await Server(config, features=features).serve()
