"""A simulated device's MQTT side: provisioning, heartbeats, commands, WiFi reports.

Each device holds its own MQTT connection (its last will is its own
`P/devices/N/status` = `offline`, retained), the way real devices do, so the
daemon's presence logic sees exactly what a fleet would send. Connections go
through the daemon's transport boundary (`provisiond.transport`), on the
native client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.logs import get_logger
from provisiond.transport import (
    Connection,
    ConnectOptions,
    Subscription,
    TransportError,
    Will,
    load_backend,
    rpc_request,
)
from provisiond.wifi.crypto import CAP_WIFI_UPLOAD, b64url_encode
from provisiond_sim.reference import ReferenceDevice

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

    def connection(
        self, client_id: str, *, credentials: Credentials | None = None, will: Will | None = None
    ) -> Connection:
        """A clean-session connection (not yet connected) as `credentials` (a device's own),
        else as the service account."""
        username, password = (
            (credentials.username, credentials.password)
            if credentials is not None
            else (self.username, self.password)
        )
        options = ConnectOptions(
            self.host,
            self.port,
            client_id=client_id,
            will=will,
            username=username,
            password=None if password is None else password.encode(),
        )
        return load_backend("native").connection(options, 1)


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
    conn = broker.connection(f"sim-rpc-{uuid.uuid4().hex[:10]}", credentials=credentials)
    await conn.connect()
    try:
        reply = await rpc_request(
            conn,
            broker.prefix,
            operation,
            body,
            key=api_key,
            reply_topic=reply_topic,
            wait_seconds=wait_seconds,
        )
        if reply is not None:
            if reply.get("status") != 200:
                raise RpcFailed(operation, reply)
            result: dict[str, Any] = reply["body"]
            return result
    finally:
        await conn.disconnect()
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
        self._conn: Connection | None = None
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
        conn = self._conn
        if conn is not None and graceful:
            with contextlib.suppress(TransportError):
                await conn.publish(self.topic("status"), b"offline", qos=1, retain=True)
        elif conn is not None:
            await conn.disconnect(with_will=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await self._task
        self.connected.clear()

    async def _run(self) -> None:
        will = Will(self.topic("status"), b"offline", qos=1, retain=True)
        conn = self.broker.connection(
            f"sim-device-{self.device_id}-{uuid.uuid4().hex[:6]}",
            credentials=self.identity.credentials,
            will=will,
        )
        await conn.connect()
        beat: asyncio.Task[None] | None = None
        try:
            self._conn = conn
            await conn.subscribe([Subscription(self.topic("commands", "reconfigure"), 1)])
            await conn.publish(self.topic("status"), b"online", qos=1, retain=True)
            await self._heartbeat(conn)
            self.connected.set()
            beat = asyncio.get_running_loop().create_task(self._beat_forever(conn))
            async for delivery in conn.deliveries():
                await self._on_command(conn, delivery.payload)
                conn.ack(delivery)
        finally:
            if beat is not None:
                beat.cancel()
            self._conn = None
            # A clean DISCONNECT (no will), unless stop() already sent one with it.
            await conn.disconnect()

    async def _heartbeat(self, client: Connection) -> None:
        body = {
            "interval": self.heartbeat_interval,
            "uptime": round(time.monotonic() - self._started),
        }
        await client.publish(self.topic("heartbeat"), json.dumps(body).encode(), qos=0)

    async def _beat_forever(self, client: Connection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            with contextlib.suppress(TransportError):
                await self._heartbeat(client)

    async def _on_command(self, client: Connection, payload: bytes) -> None:
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
        """`P/devices/N/wifi/status` after an attempt (docs/protocol.md §1)."""
        self.wifi_reports.append(report)
        doc = {
            "grant_id": report["grant_id"],
            "state": report["state"],
            "reason": report.get("reason"),
        }
        if self._conn is None:
            log.warning("sim.wifi_report_dropped", device=self.device_id)
            return
        await self._conn.publish(self.topic("wifi", "status"), json.dumps(doc).encode(), qos=1)
