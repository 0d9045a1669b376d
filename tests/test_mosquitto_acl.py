"""The shipped mosquitto config (config/mosquitto/) started as-is with the real mosquitto.

Only what cannot be shipped is rewritten: file locations (/etc/mosquitto/ →
a temp dir) and the two ports (free loopback ports). The TLS listener runs
with a throwaway CA and server certificate made here; devices use it, the
daemon and services use the loopback listener, as on a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mosquitto_proc import MosquittoProcess
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import LogCapture
from tls_support import write_tls

from provisiond import mqtt
from provisiond.config import Config
from support import free_port, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "mosquitto" / "static"
PREFIX = "provisiond"  # the shipped ACL is written for the default prefix
PASSWORDS = {
    "provisiond": "daemon-pw-1",
    "backend": "backend-pw-1",
    "1": "device-1-pw",
    "2": "device-2-pw",
}


class ExampleBroker(MosquittoProcess):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.local_port = free_port()
        self.port = self.local_port  # what support.make_config reads
        self.tls_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ExampleBroker:
        d = self.directory
        write_tls(d / "certs")
        (d / "provisiond.acl").write_text((SHIPPED / "provisiond.acl").read_text())
        passwd = d / "provisiond.passwd"
        passwd.touch(mode=0o600)
        for user, password in PASSWORDS.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
        conf = (SHIPPED / "provisiond.conf").read_text()
        for old, new in (
            ("/etc/mosquitto/", f"{d}/"),
            ("listener 1883 127.0.0.1\n", f"listener {self.local_port} 127.0.0.1\n"),
            ("listener 8883\n", f"listener {self.tls_port} 127.0.0.1\n"),
        ):
            # A rewrite that matches nothing means the shipped file changed shape.
            assert old in conf, f"shipped provisiond.conf no longer contains {old!r}"
            conf = conf.replace(old, new)
        # As root, mosquitto would switch to the `mosquitto` user, who cannot
        # read this test's private temp dir; on a gateway the files are its own.
        extra = f"log_dest file {d}/mosquitto.log\nuser {getpass.getuser()}\n"
        (d / "mosquitto.conf").write_text(conf + extra)
        self.launch("example", stderr_mode="wb")
        return self

    @contextlib.asynccontextmanager
    async def client(self, user: str | None, *, tls: bool) -> AsyncIterator[aiomqtt.Client]:
        kwargs: dict[str, Any] = {}
        if tls:
            kwargs["tls_context"] = ssl.create_default_context(
                cafile=str(self.directory / "certs" / "ca.crt")
            )
        if user is not None:
            kwargs.update(username=user, password=PASSWORDS[user])
        async with aiomqtt.Client(
            "localhost" if tls else "127.0.0.1",
            self.tls_port if tls else self.local_port,
            identifier=f"{user}-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            **kwargs,
        ) as client:
            yield client


@pytest.fixture
def example_broker(tmp_path: Path) -> Iterator[ExampleBroker]:
    broker = ExampleBroker(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


async def _collect(client: aiomqtt.Client, into: list[tuple[str, bytes]]) -> None:
    async for message in client.messages:
        payload = message.payload
        into.append((message.topic.value, payload if isinstance(payload, bytes) else b""))


def _failed(granted: Any) -> bool:
    return any(getattr(code, "value", code) >= 0x80 for code in granted)


async def test_device_cannot_publish_on_another_devices_heartbeat(
    example_broker: ExampleBroker,
) -> None:
    seen: list[tuple[str, bytes]] = []
    async with (
        example_broker.client("provisiond", tls=False) as daemon,
        example_broker.client("1", tls=True) as device1,
        example_broker.client("2", tls=True) as device2,
    ):
        granted = await daemon.subscribe(f"{PREFIX}/devices/+/heartbeat", qos=1)
        assert not _failed(granted)
        await daemon.subscribe(f"{PREFIX}/rpc/#", qos=1)
        reader = asyncio.create_task(_collect(daemon, seen))

        # Forged first and acknowledged by the broker before the real one, so
        # had it been forwarded it would arrive first.
        await device2.publish(f"{PREFIX}/devices/1/heartbeat", b'{"forged": true}', qos=1)
        await device2.publish(f"{PREFIX}/rpc/provision/token", b"{}", qos=1)
        await device1.publish(f"{PREFIX}/devices/1/heartbeat", b'{"uptime": 1}', qos=1)
        await device2.publish(f"{PREFIX}/devices/2/heartbeat", b'{"uptime": 2}', qos=1)
        await device1.publish(f"{PREFIX}/rpc/device/activate", b'{"token": "x"}', qos=1)
        deadline = asyncio.get_running_loop().time() + 5
        while len(seen) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        reader.cancel()

        assert seen == [
            (f"{PREFIX}/devices/1/heartbeat", b'{"uptime": 1}'),
            (f"{PREFIX}/devices/2/heartbeat", b'{"uptime": 2}'),
            (f"{PREFIX}/rpc/device/activate", b'{"token": "x"}'),
        ]
        # Nor may a device read another device's commands (mosquitto grants the
        # subscription but checks read access on every message it would deliver).
        got1: list[tuple[str, bytes]] = []
        got2: list[tuple[str, bytes]] = []
        await device1.subscribe(f"{PREFIX}/devices/1/commands/#", qos=1)
        await device2.subscribe(f"{PREFIX}/devices/1/commands/#", qos=1)
        await device2.subscribe(f"{PREFIX}/rpc/#", qos=1)
        readers = [
            asyncio.create_task(_collect(device1, got1)),
            asyncio.create_task(_collect(device2, got2)),
        ]
        await daemon.publish(f"{PREFIX}/devices/1/commands/reconfigure", b'{"id": 1}', qos=1)
        await device1.publish(f"{PREFIX}/rpc/device/activate", b"{}", qos=1)
        deadline = asyncio.get_running_loop().time() + 5
        while not got1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        for task in readers:
            task.cancel()
        assert got1 == [(f"{PREFIX}/devices/1/commands/reconfigure", b'{"id": 1}')]
        assert got2 == []

    # No anonymous access on either listener.
    for tls in (False, True):
        with pytest.raises(aiomqtt.MqttError):
            async with example_broker.client(None, tls=tls):
                pass


def daemon_config(example_broker: ExampleBroker, tmp_path: Path, **mqtt: Any) -> Config:
    """The daemon on its own broker account (`user provisiond` in the shipped ACL)."""
    (tmp_path / "mqtt-password").write_text(PASSWORDS["provisiond"] + "\n")
    return make_config(
        tmp_path,
        example_broker,  # type: ignore[arg-type]  # only .port is read
        mqtt={
            "topic_prefix": PREFIX,
            "username": "provisiond",
            "password_file": str(tmp_path / "mqtt-password"),
            **mqtt,
        },
    )


def daemon_and_key(example_broker: ExampleBroker, tmp_path: Path) -> tuple[Config, str]:
    """`daemon_config`, and an API key that may ask the daemon for its stats."""
    config = daemon_config(example_broker, tmp_path)
    _key_id, secret = seed_key(config, scopes=("daemon:read",))
    return config, secret


async def test_daemon_serves_through_the_example_broker(
    example_broker: ExampleBroker, tmp_path: Path
) -> None:
    """The daemon's account may do all it needs; a service and a device get their replies."""
    config, secret = daemon_and_key(example_broker, tmp_path)
    async with running(config):
        replies: list[tuple[str, bytes]] = []
        async with (
            example_broker.client("backend", tls=False) as backend,
            example_broker.client("1", tls=True) as device1,
        ):
            await backend.subscribe(f"{PREFIX}/replies/backend/#", qos=1)
            await device1.subscribe(f"{PREFIX}/devices/1/replies/#", qos=1)
            readers = [
                asyncio.create_task(_collect(backend, replies)),
                asyncio.create_task(_collect(device1, replies)),
            ]
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{PREFIX}/replies/backend/1"
            props.CorrelationData = b"c1"
            props.UserProperty = ("authorization", f"Bearer {secret}")
            await backend.publish(f"{PREFIX}/rpc/daemon/stats", b"{}", qos=1, properties=props)
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{PREFIX}/devices/1/replies/activate"
            props.CorrelationData = b"c2"
            body = {"token": "A" * 32, "capabilities": 2, "public_key": "AAAA"}
            await device1.publish(
                f"{PREFIX}/rpc/device/activate", json.dumps(body).encode(), qos=1, properties=props
            )
            deadline = asyncio.get_running_loop().time() + 10
            while len(replies) < 2 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            for reader in readers:
                reader.cancel()
    by_topic = {topic: json.loads(payload) for topic, payload in replies}
    assert by_topic[f"{PREFIX}/replies/backend/1"]["status"] == 200
    # A made-up token: the device is refused, but it does get its answer.
    assert by_topic[f"{PREFIX}/devices/1/replies/activate"]["status"] in (400, 401, 410)


async def test_daemon_connects_over_tls_and_refuses_a_broker_it_cannot_verify(
    example_broker: ExampleBroker, tmp_path: Path, logs: LogCapture
) -> None:
    """mqtt.tls: the daemon verifies the broker against ca_file, then serves through it."""
    tls = {"enabled": True, "ca_file": str(example_broker.directory / "certs" / "ca.crt")}
    config = daemon_config(
        example_broker,
        tmp_path,
        host="localhost",  # the name in the server certificate
        port=example_broker.tls_port,
        tls=tls,
    )
    _key_id, secret = seed_key(config, scopes=("daemon:read",))
    async with running(config), example_broker.client("backend", tls=True) as backend:
        await backend.subscribe(f"{PREFIX}/replies/backend/#", qos=1)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{PREFIX}/replies/backend/tls"
        props.CorrelationData = b"c1"
        props.UserProperty = ("authorization", f"Bearer {secret}")
        await backend.publish(f"{PREFIX}/rpc/daemon/stats", b"{}", qos=1, properties=props)
        async with asyncio.timeout(10):
            reply = await anext(aiter(backend.messages))
        assert json.loads(reply.payload)["status"] == 200  # type: ignore[arg-type]

    # Another CA: the handshake fails and nothing is sent, the password included.
    other = tmp_path / "other-ca"
    write_tls(other)
    client = mqtt.Client(
        "localhost",
        example_broker.tls_port,
        username="provisiond",
        password=PASSWORDS["provisiond"].encode(),
        tls=ssl.create_default_context(cafile=str(other / "ca.crt")),
    )
    with pytest.raises(mqtt.ConnectionLost, match="CERTIFICATE_VERIFY_FAILED") as failed:
        await client.connect()
    password = PASSWORDS["provisiond"]
    assert password not in str(failed.value)
    assert password not in repr(logs.entries)  # the daemon's own connection, above


async def test_a_reply_the_acl_refuses_is_logged_and_the_request_acknowledged(
    example_broker: ExampleBroker, tmp_path: Path, logs: LogCapture
) -> None:
    """A Response Topic outside the daemon's ACL: mosquitto refuses the reply (0x87).
    The request is acknowledged all the same (a redelivery would only be refused
    again), the refusal is logged, and the daemon keeps serving."""
    config, secret = daemon_and_key(example_broker, tmp_path)
    async with running(config) as server, example_broker.client("backend", tls=False) as backend:
        await backend.subscribe(f"{PREFIX}/replies/backend/#", qos=1)
        for topic, corr in (("outside/the/acl", b"c1"), (f"{PREFIX}/replies/backend/ok", b"c2")):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = topic
            props.CorrelationData = corr
            props.UserProperty = ("authorization", f"Bearer {secret}")
            await backend.publish(f"{PREFIX}/rpc/daemon/stats", b"{}", qos=1, properties=props)
        async with asyncio.timeout(10):
            reply = await anext(aiter(backend.messages))
        assert reply.topic.value == f"{PREFIX}/replies/backend/ok"
        lines = [e for e in logs.entries if e["event"] == "rpc"]
        refused = [e for e in lines if "refused by the broker" in str(e.get("reply", ""))]
        assert len(refused) == 1 and "0x87" in refused[0]["reply"]
        await asyncio.sleep(1)  # an unacknowledged request would be redelivered meanwhile
        assert server.app is not None and server.app.transport.connections == 1
        assert len([e for e in logs.entries if e["event"] == "rpc"]) == 2


async def test_status_over_tls_with_the_daemons_own_broker_settings(
    example_broker: ExampleBroker, tmp_path: Path
) -> None:
    """`provisiond status` with `[mqtt.tls] enabled = true` died with a TypeError
    (`tls` passed to aiomqtt); it now goes through the daemon's transport boundary."""
    from daemon_proc import write_toml
    from test_cli_ops import provisiond

    tls = {"enabled": True, "ca_file": str(example_broker.directory / "certs" / "ca.crt")}
    config = daemon_config(
        example_broker, tmp_path, host="localhost", port=example_broker.tls_port, tls=tls
    )
    _key_id, secret = seed_key(config, scopes=("daemon:read",))
    config_file = write_toml(config, tmp_path / "p.toml")
    async with running(config):
        code, out, err = await provisiond("status", "-c", str(config_file), PROVISIOND_KEY=secret)
    assert code == 0, err
    assert "broker connected" in out
    assert PASSWORDS["provisiond"] not in out + err
    # Without the daemon: a clear line, no traceback, no password.
    code, _out, err = await provisiond(
        "status", "--timeout", "1", "-c", str(config_file), PROVISIOND_KEY=secret
    )
    assert code == 1 and "no reply from the daemon within 1s" in err, err
    assert "Traceback" not in err and PASSWORDS["provisiond"] not in err


async def test_a_group_of_daemons_serves_through_the_example_broker(
    example_broker: ExampleBroker, tmp_path: Path
) -> None:
    """Two daemons in one group (`[mqtt] shared_group`, docs/scaling.md) on the shipped
    ACL: the daemons' account may subscribe to the shared filters on both links (a
    refused or downgraded subscription keeps a daemon from becoming ready), and the
    broker spreads a service's requests over both."""
    config = daemon_config(example_broker, tmp_path, shared_group="fleet", client_id="node-a")
    _key_id, secret = seed_key(config, scopes=("daemon:read",))
    other = config.model_copy(
        update={"mqtt": config.mqtt.model_copy(update={"client_id": "node-b"})}
    )
    leaders: list[bool] = []
    async with (
        running(config),
        running(other),
        example_broker.client("backend", tls=False) as backend,
    ):
        await backend.subscribe(f"{PREFIX}/replies/backend/#", qos=1)
        for i in range(20):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{PREFIX}/replies/backend/group"
            props.CorrelationData = f"g{i}".encode()
            props.UserProperty = ("authorization", f"Bearer {secret}")
            await backend.publish(f"{PREFIX}/rpc/daemon/stats", b"{}", qos=1, properties=props)
        async with asyncio.timeout(10):
            async for message in backend.messages:
                reply = json.loads(message.payload)  # type: ignore[arg-type]
                assert reply["status"] == 200
                leaders.append(reply["body"]["cluster"]["leader"])
                if len(leaders) == 20:
                    break
    # One daemon of the group leads: replies from both mean both were served.
    assert True in leaders and False in leaders, leaders
