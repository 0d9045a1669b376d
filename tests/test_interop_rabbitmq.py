"""The native client against a second broker implementation: Debian's RabbitMQ.

RabbitMQ 3.10's MQTT plugin speaks MQTT 3.1.1 only. At an MQTT 5 CONNECT it
fails to parse the frame and closes the connection without any CONNACK; the
daemon must say "the broker does not speak MQTT 5", not "connection closed",
and back off. A throwaway node on free ports, with its own data, log, node
name and config, is started for this module (skipped if it cannot start).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import LogCapture

from provisiond import mqtt
from provisiond.transport import Subscription, Transport
from tests.support import Broker, eventually, free_port, make_config
from tests.test_transport import events, transport_running

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_SECONDS = 90


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The MQTT port of a private RabbitMQ node."""
    if not os.path.exists(RABBITMQ_SERVER) or shutil.which("erl") is None:
        pytest.skip("rabbitmq-server is not installed (Debian package rabbitmq-server)")
    base = tmp_path_factory.mktemp("rabbitmq")
    mqtt_port, amqp_port, dist_port = free_port(), free_port(), free_port()
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = {amqp_port}\n"
        f"mqtt.listeners.tcp.default = {mqtt_port}\n"
        "mqtt.allow_anonymous = true\n"
    )
    (base / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
    env = {
        **os.environ,
        "HOME": str(base),  # its Erlang cookie goes here, not in the real home
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_NODENAME": f"pvd-test-{uuid.uuid4().hex[:8]}@localhost",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
    }
    out = (base / "server.out").open("ab")
    proc = subprocess.Popen(
        [RABBITMQ_SERVER], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.skip(f"RabbitMQ exited: {(base / 'server.out').read_text()[-500:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", mqtt_port), 0.5),
            ):
                break
            if time.monotonic() > deadline:
                pytest.skip(f"RabbitMQ's MQTT listener did not open within {START_SECONDS}s")
            time.sleep(0.5)
        yield mqtt_port
    finally:
        # The launcher script, the Erlang VM and epmd-less children share our session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_the_native_client_says_rabbitmq_does_not_speak_mqtt5(rabbitmq: int) -> None:
    with pytest.raises(mqtt.BrokerNotMqtt5, match="does not speak MQTT 5") as refused:
        await mqtt.Client("127.0.0.1", rabbitmq, client_id="pvd-interop").connect()
    assert refused.value.hung_up
    assert refused.value.return_code == 0  # it does answer MQTT 3.1.1
    assert "closed the connection at our MQTT 5 CONNECT" in str(refused.value)


@pytest.mark.parametrize("client", ["native", "aiomqtt"])
async def test_the_daemon_refuses_rabbitmq_by_name_and_backs_off(
    tmp_path: Path, rabbitmq: int, logs: LogCapture, client: str
) -> None:
    config: Any = make_config(
        tmp_path,
        Broker(tmp_path / "unused", port=rabbitmq),
        uses_store=False,
        mqtt={"client": client, "reconnect_min_seconds": 0.2, "reconnect_max_seconds": 0.8},
    )
    transport = Transport(config)
    async with transport_running(transport, [Subscription("p/rpc/#", 1)], []):
        # paho notices the hang-up only at its connect timeout (10 s by default).
        await eventually(lambda: events(logs, "mqtt.connect_refused"), timeout=20)
        await asyncio.sleep(1.0 if client == "native" else 0)
        assert not transport.subscribed.is_set()
    refused = events(logs, "mqtt.connect_refused")
    assert 1 <= len(refused) <= 8
    assert all("does not speak MQTT 5" in e["error"] for e in refused)
    assert not events(logs, "mqtt.disconnected")
