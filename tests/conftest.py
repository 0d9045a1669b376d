from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import LogCapture

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--heavy"):
        return
    skip = pytest.mark.skip(reason="heavy variant: run with --heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


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
