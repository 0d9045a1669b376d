"""Suite-wide options and fixtures.

Two passes (README, "Tests"): `pytest` runs everything on SQLite;
`pytest --store postgresql` (`scripts/test.sh --store postgresql`) runs the
tests marked `store` again on a throwaway PostgreSQL cluster. How a test is
marked, and why an unmarked one that makes a store fails: see
`pytest_collection_modifyitems` below.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import LogCapture

import support
from provisiond.config import Config
from provisiond.server import Server
from support import MQTT_CLIENT_ENV, Broker, RpcClient, log_sink, make_config, running

pytest_plugins = ["leakcheck"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--heavy", action="store_true", help="run the heavy load/fault variants")
    parser.addoption(
        "--mqtt-client",
        choices=("native", "aiomqtt"),
        default=None,
        help=f"the daemon's MQTT backend in every test daemon (or ${MQTT_CLIENT_ENV})",
    )
    parser.addoption(
        "--store",
        choices=["sqlite", "postgresql"],
        default=None,
        help="the store the daemon's tests run on (default: $TEST_STORE, else sqlite)",
    )


def pytest_configure(config: pytest.Config) -> None:
    import pg_cluster

    chosen = config.getoption("--mqtt-client")
    if chosen:
        os.environ[MQTT_CLIENT_ENV] = chosen
    store = config.getoption("--store")
    if store:
        # Through the environment, so the daemons the tests start as processes agree.
        os.environ[pg_cluster.ENV] = store


def pytest_report_header(config: pytest.Config) -> str:
    import pg_cluster

    return (
        f"provisiond MQTT backend: {os.environ.get(MQTT_CLIENT_ENV) or 'native'};"
        f" store: {os.environ.get(pg_cluster.ENV) or 'sqlite'}"
    )


def touches_store(item: pytest.Item) -> bool:
    """Whether a test belongs to the PostgreSQL pass (see `pytest_collection_modifyitems`)."""
    return item.get_closest_marker("store") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Which tests touch a store, and what the PostgreSQL pass runs.

    A test touches a store when it starts a daemon, runs the CLI on a store or
    opens one. It says so with the `store` marker: tests using the `config`
    fixture (and so `daemon`, `rpc`) get it here; others carry
    `@pytest.mark.store` or their module's `pytestmark = pytest.mark.store`.
    A test of SQLite itself (its file, PRAGMAs, WAL) carries
    `support.sqlite_only("why")`, which counts as `store`.

    `--store postgresql` runs the `store` tests only, deselecting the rest
    (pure unit tests, the MQTT client, firmware builds: they never reach a
    store, so the SQLite pass already ran them exactly as they would run
    here), and skips `sqlite_only` ones with their reason. A test that makes
    a store (`make_config`, `new_store_toml`) without the mark fails on both
    passes, so a forgotten mark cannot silently drop a test from this pass.
    """
    import pg_cluster

    for item in items:
        if "config" in getattr(item, "fixturenames", ()) or item.get_closest_marker("sqlite_only"):
            item.add_marker(pytest.mark.store)
    if pg_cluster.store_under_test() == "postgresql":
        selected = [item for item in items if touches_store(item)]
        deselected = [item for item in items if not touches_store(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = selected
        for item in items:
            only = item.get_closest_marker("sqlite_only")
            if only is not None:
                item.add_marker(pytest.mark.skip(reason=f"SQLite only: {only.kwargs['reason']}"))
    if not config.getoption("--heavy"):
        skip = pytest.mark.skip(reason="heavy variant: run with --heavy")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Read by support.make_config: making a store in an unmarked test fails it.
    support.CURRENT_TEST_MARKED[0] = touches_store(item)


@pytest.fixture(scope="session")
def heavy(request: pytest.FixtureRequest) -> bool:
    """True with --heavy: load and fault tests then run their full-size variant."""
    return bool(request.config.getoption("--heavy"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker only this test uses (for restarts and kills)."""
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every log event of the test, as dicts, before rendering (and before redaction)."""
    cap = LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[log_sink, cap])
    yield cap
    structlog.configure(**old)


@pytest.fixture
def config(tmp_path: Path, broker: Broker) -> Config:
    return make_config(tmp_path, broker)


@pytest.fixture
async def daemon(config: Config, logs: LogCapture) -> AsyncIterator[Server]:
    async with running(config) as server:
        yield server


@pytest.fixture
async def rpc(config: Config, daemon: Server) -> AsyncIterator[RpcClient]:
    async with RpcClient(config) as client:
        yield client
