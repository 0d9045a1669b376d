"""The device simulator's MQTT side, against a real broker and daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from provisiond.config import Config
from provisiond.server import Server
from provisiond_sim import Broker as SimBroker
from provisiond_sim import Fleet, RpcFailed, provision
from support import RpcClient, eventually, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def key(config: Config) -> str:
    return seed_key(config, org=1, users=(1,))[1]


async def collect(config: Config, pattern: str, into: list[tuple[str, Any]]) -> aiomqtt.Client:
    client = aiomqtt.Client("127.0.0.1", config.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5)
    await client.__aenter__()
    await client.subscribe(f"{config.mqtt.topic_prefix}/{pattern}", qos=1)

    async def read() -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                into.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]

    asyncio.get_running_loop().create_task(read())
    return client


async def test_fleet_provisions_heartbeats_and_acks(
    config: Config, daemon: Server, key: str
) -> None:
    seen: list[tuple[str, Any]] = []
    watcher = await collect(config, "devices/#", seen)
    fleet = Fleet(
        SimBroker("127.0.0.1", config.mqtt.port, config.mqtt.topic_prefix), heartbeat_interval=0.2
    )
    try:
        devices = await fleet.provision(3, api_key=key, org_id=1, owner_id=1)
        ids = [d.device_id for d in devices]
        assert len(set(ids)) == 3
        prefix = config.mqtt.topic_prefix
        # Activated in the store with the key each device generated.
        assert daemon.app is not None
        for dev in devices:
            assert dev.identity.pinned_keys, "activation reply carries the grant verification key"
        # Online status and repeated heartbeats from each.
        for n in ids:
            await eventually(lambda n=n: (f"{prefix}/devices/{n}/status", b"online") in seen)
            await eventually(
                lambda n=n: sum(t == f"{prefix}/devices/{n}/heartbeat" for t, _ in seen) >= 2
            )
        beat = json.loads(next(p for t, p in seen if t.endswith("/heartbeat")))
        assert beat["interval"] == 0.2

        # A reconfigure command is acknowledged with its id.
        command = {"id": "cmd-1", "command": "reconfigure", "issued_at": "x", "expires_at": "y"}
        await watcher.publish(
            f"{prefix}/devices/{ids[0]}/commands/reconfigure", json.dumps(command), qos=1
        )
        await eventually(
            lambda: (
                (f"{prefix}/devices/{ids[0]}/commands/ack", b'{"id": "cmd-1", "result": "ok"}')
                in seen
            )
        )
        assert devices[0].commands == [command]

        # A device that drops off without a goodbye: its last will says offline, retained.
        await devices[1].stop(graceful=False)
        await eventually(
            lambda: (f"{prefix}/devices/{ids[1]}/status", b"offline") in seen, timeout=10
        )
    finally:
        await fleet.stop()
        await watcher.__aexit__(None, None, None)


async def test_provision_with_a_bad_key_fails_cleanly(config: Config, daemon: Server) -> None:
    with pytest.raises(RpcFailed) as exc:
        await provision(
            SimBroker("127.0.0.1", config.mqtt.port, config.mqtt.topic_prefix),
            api_key="sk_live_nope",
            org_id=1,
            owner_id=1,
        )
    assert exc.value.status == 401


async def test_cli_runs_a_fleet(config: Config, daemon: Server, key: str, rpc: RpcClient) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provisiond_sim",
        "--port", str(config.mqtt.port), "--prefix", config.mqtt.topic_prefix,
        "--devices", "2", "--key", key, "--org", "1", "--owner", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"2 device(s) online" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
