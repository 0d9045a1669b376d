"""The firmware library as a whole device, end to end: firmware/examples/
host_device.c (the library plus libmosquitto, a real process) activates
against the daemon over the real broker, heartbeats, acks a reconfigure and
takes a WiFi grant, reporting the outcome on MQTT."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from daemon_proc import reaped
from firmware_support import host_device
from presence_support import Watcher

from provisiond.config import Config
from provisiond.presence import PRESENCE
from provisiond.wifi.crypto import b64url_decode, b64url_encode
from provisiond.wifi.service import GRANTS
from provisiond.wifi.uploader import Uploader
from support import Broker, RpcClient, eventually, make_config, remember_secret, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

SSID = "provisiond-lab"
PASSWORD = remember_secret("correct horse battery staple")
WRONG = remember_secret("not the right password")


@dataclass
class HostDevice:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """The next stdout line starting with `prefix` (earlier ones are kept)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"device exited; output: {self.lines}")
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if line.startswith(prefix):
                    return line

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()


@asynccontextmanager
async def host(
    config: Config, device_id: int, token: str, state: Path
) -> AsyncIterator[HostDevice]:
    proc = await asyncio.create_subprocess_exec(
        str(host_device()),
        "--host",
        "127.0.0.1",
        "--port",
        str(config.mqtt.port),
        "--prefix",
        config.mqtt.topic_prefix,
        "--device-id",
        str(device_id),
        "--token",
        token,
        "--state",
        str(state),
        "--ssid",
        SSID,
        "--heartbeat",
        "1",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # The one network in range: its password through the environment, not argv.
        env={**os.environ, "PD_WIFI_PASSWORD": PASSWORD},
    )
    async with reaped(proc):
        yield HostDevice(proc)


async def test_c_host_device_against_the_real_daemon(tmp_path: Path, broker: Broker) -> None:
    config = make_config(tmp_path, broker, wifi={"signing_algorithm": "ES256"})
    _, key = seed_key(config, org=1, users=(1,))
    state = tmp_path / "device-state"
    state.mkdir()
    async with (
        running(config) as server,
        RpcClient(config) as rpc,
        Watcher(config, ["events/#", "devices/+/heartbeat", "devices/+/commands/ack"]) as seen,
    ):
        assert server.app is not None
        issued = await rpc.call("provision/token", {"orgId": 1, "ownerId": 1}, key=key)
        assert issued["status"] == 200, issued
        device_id, token = issued["body"]["deviceId"], issued["body"]["token"]
        remember_secret(token)

        async with host(config, device_id, token, state) as dev:
            # Activation: the daemon now holds the C device's public key.
            line = await dev.expect("activated")
            assert f"device_id={device_id} alg=ES256" in line
            got = await rpc.call("device/get", {"deviceId": device_id}, key=key)
            assert got["status"] == 200, got
            device_key = (state / "x25519.key").read_bytes()
            public = X25519PrivateKey.from_private_bytes(device_key).public_key().public_bytes_raw()
            event, _ = await seen.got.wait_for(
                "/events/device/activated", lambda b: b["deviceId"] == device_id
            )
            assert event["capabilities"] == 2 and event["firmware_version"] == "host-1.0"

            # Heartbeats make it online.
            presence = server.app.services.get(PRESENCE)
            await eventually(lambda: presence.mqtt_online(device_id), timeout=10)
            await dev.expect("heartbeat")

            # A reconfigure is delivered and acked by the C device.
            reply = await rpc.call("provision/reconfigure", {"deviceId": device_id}, key=key)
            assert reply["status"] == 200, reply
            command_id = reply["body"]["commandId"]
            assert await dev.expect("ack") == f"ack id={command_id}"
            await seen.got.wait_for(
                "/events/command",
                lambda b: b["commandId"] == command_id and b["state"] == "acked",
                timeout=10,
            )

            # WiFi: a wrong password, then the right one, each on a fresh grant.
            for password, outcome in ((WRONG, "failed"), (PASSWORD, "connected")):
                await dev.send("INFO")
                info = _info(await dev.expect("info"))
                assert info["device_id"] == device_id
                assert b64url_decode(info["public_key"]) == public
                grant_id = await _wifi_attempt(rpc, key, dev, info, password, outcome)
                event_topic = (
                    "/events/wifi/configured" if outcome == "connected" else "/events/wifi/failed"
                )
                event, _ = await seen.got.wait_for(
                    event_topic, lambda b, g=grant_id: b["grant_id"] == g, timeout=10
                )
                assert event["device_id"] == device_id
                if outcome == "failed":
                    assert event["reason"] == "wrong_password"
                assert await server.app.services.get(GRANTS).is_consumed(grant_id)
                # The bridge waits a second between grants to one device; so do we.
                await asyncio.sleep(1.05)

            await dev.send("QUIT")
            assert await asyncio.wait_for(dev.proc.wait(), 10) == 0
            assert dev.proc.stderr is not None
            stderr = (await dev.proc.stderr.read()).decode()

        # Clean exit: it said offline itself, no will needed.
        await eventually(lambda: not presence.mqtt_online(device_id), timeout=10)
    output = "\n".join(dev.lines) + stderr
    assert PASSWORD not in output and WRONG not in output
    # Freshness was persisted through the callback: two accepted grants.
    assert (state / "freshness.bin").stat().st_size > 0


async def _wifi_attempt(
    rpc: RpcClient, key: str, dev: HostDevice, info: dict[str, Any], password: str, outcome: str
) -> str:
    ephemeral = X25519PrivateKey.generate()
    reply = await rpc.call(
        "wifi-config/grant",
        {
            "device_id": info["device_id"],
            "app_public_key": b64url_encode(ephemeral.public_key().public_bytes_raw()),
            "device_nonce": info["nonce"],
        },
        key=key,
    )
    assert reply["status"] == 200, reply
    blob = reply["body"]["grant_blob"]
    # The daemon stored the key the C device sent at activation.
    assert reply["body"]["device_public_key"] == info["public_key"]
    uploader = Uploader.for_grant(
        blob,
        ephemeral_private=ephemeral,
        device_public_key=b64url_decode(info["public_key"]),
    )
    await dev.send(f"GRANT {blob}")
    assert await dev.expect("grant") == "grant accepted"
    statuses = [uploader.read_status(await _sealed(dev))]
    await dev.send(f"CRED {uploader.credential_message(SSID, password).hex()}")
    statuses.append(uploader.read_status(await _sealed(dev)))
    statuses.append(uploader.read_status(await _sealed(dev)))
    assert [s["state"] for s in statuses] == ["grant-accepted", "connecting", outcome]
    if outcome == "failed":
        assert statuses[-1]["reason"] == "wrong_password"
    line = await dev.expect("wifi")
    assert line.startswith(f"wifi state={outcome} grant={uploader.grant_id}")
    return uploader.grant_id


async def _sealed(dev: HostDevice) -> bytes:
    message = bytes.fromhex((await dev.expect("status ")).split(" ", 1)[1])
    assert message[0] == 0x01, message
    return message[1:]


def _info(line: str) -> dict[str, Any]:
    import json

    doc: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    return doc
