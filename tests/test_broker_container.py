"""The same RPC path against mosquitto in a container, when a Docker engine answers.

The suite runs against a local `mosquitto` binary everywhere; this test adds
the containerised broker (testcontainers) on machines that have an engine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from support import Broker, RpcClient, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store


def docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"], capture_output=True, timeout=10, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(
    not docker_engine_answers(),
    reason="no Docker engine answers on this machine; the suite uses the local mosquitto binary instead",
)
async def test_whoami_through_a_mosquitto_container(tmp_path: Path) -> None:
    container_mod = pytest.importorskip(
        "testcontainers.core.container", reason="testcontainers not installed"
    )
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 0.0.0.0\nallow_anonymous true\nset_tcp_nodelay true\n")
    container = (
        container_mod.DockerContainer("eclipse-mosquitto:2")
        .with_exposed_ports(1883)
        .with_volume_mapping(str(conf), "/mosquitto/config/mosquitto.conf")
    )
    with container:
        broker = Broker(tmp_path / "unused", port=int(container.get_exposed_port(1883)))
        config = make_config(tmp_path, broker)
        _, key = seed_key(config)
        async with running(config), RpcClient(config) as rpc:
            reply = await rpc.call("keys/whoami", {}, key=key)
    assert reply["status"] == 200
