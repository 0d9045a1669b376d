"""A simulated device's MQTT side: provisioning, heartbeats, commands, WiFi reports.

Each device holds its own MQTT connection (its last will is its own
`P/devices/N/status` = `offline`, retained), the way real devices do, so the
daemon's presence logic sees exactly what a fleet would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from provisiond.device import ReferenceDevice
from provisiond.logs import get_logger
from provisiond.wifi.crypto import CAP_WIFI_UPLOAD, b64url_encode

log = get_logger("provisiond.sim")


class RpcFailed(Exception):
    def __init__(self, operation: str, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        super().__init__(f"{operation}: {reply.get('status')} {error.get('code')}")
        self.status = reply.get("status")
        self.code = error.get("code")


@dataclass
class Broker:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "provisiond"
    # The service account that asks for provision tokens (None: anonymous).
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def client(
        self, client_id: str, *, credentials: Credentials | None = None, **kwargs: Any
    ) -> aiomqtt.Client:
        """A connection as `credentials` (a device's own), else as the service account."""
        if credentials is not None:
            kwargs.update(username=credentials.username, password=credentials.password)
        elif self.username is not None:
            kwargs.update(username=self.username, password=self.password)
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            **kwargs,
        )


@dataclass(frozen=True)
class Credentials:
    """A device's own broker account, from its provision reply's `mqtt`."""

    username: str
    password: str = field(repr=False)


async def rpc_call(
    broker: Broker,
    operation: str,
    body: dict[str, Any],
    *,
    reply_topic: str,
    api_key: str | None = None,
    wait_seconds: float = 10.0,
    credentials: Credentials | None = None,
) -> dict[str, Any]:
    """One MQTT v5 request/response; returns the reply body or raises RpcFailed."""
    correlation = uuid.uuid4().bytes
    async with broker.client(f"sim-rpc-{uuid.uuid4().hex[:10]}", credentials=credentials) as client:
        await client.subscribe(reply_topic, qos=1)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        if api_key is not None:
            props.UserProperty = [("authorization", f"Bearer {api_key}")]
        await client.publish(
            f"{broker.prefix}/rpc/{operation}", json.dumps(body).encode(), qos=1, properties=props
        )
        async with asyncio.timeout(wait_seconds):
            async for message in client.messages:
                corr = getattr(message.properties, "CorrelationData", None)
                if corr is None or bytes(corr) != correlation:
                    continue
                reply: dict[str, Any] = json.loads(bytes(message.payload))
                if reply.get("status") != 200:
                    raise RpcFailed(operation, reply)
                result: dict[str, Any] = reply["body"]
                return result
    raise RpcFailed(operation, {"status": None})  # pragma: no cover - the loop only ends by timeout


@dataclass
class Identity:
    """What a device keeps in flash after activation."""

    device_id: int
    private_key: X25519PrivateKey = field(repr=False)
    pinned_keys: list[dict[str, Any]]
    heartbeat_interval: float
    capabilities: int = CAP_WIFI_UPLOAD
    # Its own broker account, when the daemon issues them (broker_accounts).
    credentials: Credentials | None = None


async def provision(
    broker: Broker,
    *,
    api_key: str,
    org_id: int,
    owner_id: int,
    capabilities: int = CAP_WIFI_UPLOAD,
    firmware_version: str = "sim-1",
) -> Identity:
    """Get a provision token (as a backend service would) and activate with it."""
    issued = await rpc_call(
        broker,
        "provision/token",
        {"orgId": org_id, "ownerId": owner_id},
        # Under the service's own replies/<username>/, which its broker role reads.
        reply_topic=f"{broker.prefix}/replies/{broker.username or 'sim'}/{uuid.uuid4().hex}",
        api_key=api_key,
    )
    device_id = int(issued["deviceId"])
    mqtt = issued.get("mqtt")
    credentials = (
        Credentials(str(mqtt["username"]), str(mqtt["password"]))
        if isinstance(mqtt, dict)
        else None
    )
    private = X25519PrivateKey.generate()
    activated = await rpc_call(
        broker,
        "device/activate",
        {
            "token": issued["token"],
            "capabilities": capabilities,
            "public_key": b64url_encode(private.public_key().public_bytes_raw()),
            "firmware_version": firmware_version,
        },
        # Inside the device's own subtree, which its broker ACL allows.
        reply_topic=f"{broker.prefix}/devices/{device_id}/replies/activate",
        credentials=credentials,
    )
    return Identity(
        device_id=device_id,
        private_key=private,
        pinned_keys=list(activated["grant_verification_keys"]),
        heartbeat_interval=float(activated["heartbeat_interval"]),
        capabilities=capabilities,
        credentials=credentials,
    )


class SimDevice:
    """One device online over MQTT: status, heartbeats, command acks, WiFi reports."""

    def __init__(
        self,
        broker: Broker,
        identity: Identity,
        *,
        heartbeat_interval: float | None = None,
        ack_result: str = "ok",
    ) -> None:
        self.broker = broker
        self.identity = identity
        self.device_id = identity.device_id
        self.heartbeat_interval = heartbeat_interval or identity.heartbeat_interval
        self.ack_result = ack_result
        self.reference = ReferenceDevice(
            identity.device_id,
            identity.private_key,
            identity.pinned_keys,
            capabilities=identity.capabilities,
        )
        self.commands: list[dict[str, Any]] = []
        self.wifi_reports: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    def topic(self, *parts: str) -> str:
        return "/".join([self.broker.prefix, "devices", str(self.device_id), *parts])

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10)

    async def stop(self, *, graceful: bool = True) -> None:
        """Disconnect; `graceful=False` makes the broker publish the last will, as
        when a device loses power (MQTT v5 reason 0x04, "disconnect with will")."""
        if self._client is not None and graceful:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.publish(self.topic("status"), b"offline", qos=1, retain=True)
        elif self._client is not None:
            self._client._client.disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
            )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        self.connected.clear()

    async def _run(self) -> None:
        will = aiomqtt.Will(self.topic("status"), b"offline", qos=1, retain=True)
        async with self.broker.client(
            f"sim-device-{self.device_id}-{uuid.uuid4().hex[:6]}",
            credentials=self.identity.credentials,
            will=will,
        ) as client:
            self._client = client
            await client.subscribe(self.topic("commands", "reconfigure"), qos=1)
            await client.publish(self.topic("status"), b"online", qos=1, retain=True)
            await self._heartbeat(client)
            self.connected.set()
            beat = asyncio.get_running_loop().create_task(self._beat_forever(client))
            try:
                async for message in client.messages:
                    await self._on_command(client, bytes(message.payload))
            finally:
                beat.cancel()
                self._client = None

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        body = {
            "interval": self.heartbeat_interval,
            "uptime": round(time.monotonic() - self._started),
        }
        await client.publish(self.topic("heartbeat"), json.dumps(body).encode(), qos=0)

    async def _beat_forever(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            with contextlib.suppress(aiomqtt.MqttError):
                await self._heartbeat(client)

    async def _on_command(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            command = json.loads(payload)
        except ValueError:
            return
        if not isinstance(command, dict) or "id" not in command:
            return
        self.commands.append(command)
        ack = {"id": command["id"], "result": self.ack_result}
        await client.publish(self.topic("commands", "ack"), json.dumps(ack).encode(), qos=1)

    async def report_wifi(self, report: dict[str, Any]) -> None:
        """`P/devices/N/wifi/status` after an attempt (DESIGN §4)."""
        self.wifi_reports.append(report)
        doc = {
            "grant_id": report["grant_id"],
            "state": report["state"],
            "reason": report.get("reason"),
        }
        if self._client is None:
            log.warning("sim.wifi_report_dropped", device=self.device_id)
            return
        await self._client.publish(self.topic("wifi", "status"), json.dumps(doc).encode(), qos=1)
