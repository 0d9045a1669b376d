"""`provisiond.client`: call the daemon's RPC operations from Python.

    async with ProvisiondClient("127.0.0.1", 1883, key=API_KEY) as c:
        created = await c.provision_token(org_id=1, owner_id=7)
        grant = await c.wifi_config_grant(device_id=created["deviceId"])

One typed method per operation (docs/protocol.md has the table and an example
for each); `request()` calls any operation by name. An error reply raises
`RpcError` with its status, code and field. Each call has a timeout; within it
the request is published again if no reply came, *with the same correlation
data*, so the daemon answers the repeat from its replay record and nothing is
done twice. Replies nobody is waiting for (late duplicates, strangers') are
discarded.

Only aiomqtt and paho-mqtt are needed (the `client` extra): this module
imports nothing else, of the daemon or otherwise, so a service can use it (or
vendor this one file) without the daemon's dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import ssl
import uuid
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict, Unpack

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = [
    "OPERATIONS",
    "CallTimeout",
    "ClientError",
    "ConnectionFailed",
    "ProvisiondClient",
    "Reply",
    "RpcError",
]

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_RETRIES: Final = 2
CORRELATION_BYTES: Final = 16

# Operation name -> (method name, {method parameter: body field}). The test
# suite checks this against the daemon's registered operations and their body
# schemas, so the client cannot drift from the server.
OPERATIONS: Final[dict[str, tuple[str, dict[str, str]]]] = {
    "keys/whoami": ("keys_whoami", {}),
    "daemon/stats": ("daemon_stats", {}),
    "wifi-config/grant": (
        "wifi_config_grant",
        {
            "device_id": "device_id",
            "expires_in_seconds": "expires_in_seconds",
            "app_public_key": "app_public_key",
            "device_nonce": "device_nonce",
        },
    ),
    "wifi-config/keys": ("wifi_config_keys", {}),
    "wifi-config/upload": (
        "wifi_config_upload",
        {
            "device_id": "device_id",
            "ssid": "ssid",
            "password": "password",
            "security": "security",
            "timeout_seconds": "timeout_seconds",
        },
    ),
    "provision/token": ("provision_token", {"org_id": "orgId", "owner_id": "ownerId"}),
    "provision/reprovision/token": ("provision_reprovision_token", {"device_id": "deviceId"}),
    "provision/reconfigure": ("provision_reconfigure", {"device_id": "deviceId"}),
    "device/activate": (
        "device_activate",
        {
            "token": "token",
            "capabilities": "capabilities",
            "public_key": "public_key",
            "firmware_version": "firmware_version",
            "csr": "csr",
        },
    ),
    "device/decommission": ("device_decommission", {"device_id": "deviceId"}),
    "device/get": ("device_get", {"device_id": "deviceId"}),
    "device/list": ("device_list", {"limit": "limit", "after": "after"}),
}

Protocol = Literal["5", "3.1.1"]


class ClientError(Exception):
    """Base of everything this module raises."""


class RpcError(ClientError):
    """The daemon answered with an error status (4xx/5xx)."""

    def __init__(
        self,
        operation: str,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        error_id: str | None = None,
    ) -> None:
        super().__init__(
            f"{operation}: {status} {code}: {message}" + (f" (field {field})" if field else "")
        )
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        # Set on 500s: the reference the daemon logged the failure under.
        self.error_id = error_id


class CallTimeout(ClientError, TimeoutError):
    """No reply within the call's timeout (after its retries)."""

    def __init__(self, operation: str, timeout: float, attempts: int) -> None:
        super().__init__(
            f"{operation}: no reply within {timeout:g}s ({attempts} attempt(s)); "
            "is the daemon running, the topic prefix right, and may this account read "
            "the reply topic?"
        )
        self.operation = operation
        self.timeout = timeout
        self.attempts = attempts


class ConnectionFailed(ClientError):
    """The broker could not be reached, refused us, or the connection broke."""


@dataclass(frozen=True)
class Reply:
    """A reply envelope: `body` on 2xx, `error` otherwise."""

    status: int
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.body is not None:
            out["body"] = self.body
        if self.error is not None:
            out["error"] = self.error
        return out

    def raise_for_status(self, operation: str) -> dict[str, Any]:
        if self.ok:
            return self.body or {}
        error = self.error or {}
        raise RpcError(
            operation,
            self.status,
            str(error.get("code", "unknown")),
            str(error.get("message", "")),
            error.get("field"),
            error.get("error_id"),
        )


class CallOptions(TypedDict, total=False):
    """What one call may set for itself, else the client's own (see `call`)."""

    timeout: float | None
    retries: int | None
    correlation: bytes | None


class ProvisiondClient:
    """An MQTT requester for provisiond; use as `async with`.

    `key` is the API key (sent as `authorization: Bearer <key>`; never logged
    by the daemon). `tls`: True for the system CA store, or an SSLContext.
    `protocol` "5" (default) uses Response Topic and Correlation Data;
    "3.1.1" puts `reply_to`, `correlation_id` and `authorization` in the body.
    `timeout` is per call; `retries` is how many times a call is re-published
    (same correlation data) within it when no reply has come.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 1883,
        *,
        key: str | None = None,
        tls: ssl.SSLContext | bool = False,
        username: str | None = None,
        password: str | None = None,
        prefix: str = "provisiond",
        protocol: Protocol = "5",
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        client_id: str | None = None,
        reply_topic: str | None = None,
    ) -> None:
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', not {protocol!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.host = host
        self.port = port
        self.prefix = prefix.rstrip("/")
        self.protocol: Protocol = protocol
        self.timeout = timeout
        self.retries = retries
        self._key = key
        tag = uuid.uuid4().hex
        self.client_id = client_id or f"provisiond-client-{tag[:12]}"
        # Under <prefix>/replies/ (the daemon refuses other topics in its
        # namespace); the shipped ACL lets a service read replies/<username>/#.
        owner = f"{username}/" if username else ""
        self.reply_topic = reply_topic or f"{self.prefix}/replies/{owner}{tag}"
        if tls is True:
            tls_context: ssl.SSLContext | None = ssl.create_default_context()
        else:
            tls_context = tls or None
        self._mqtt = aiomqtt.Client(
            host,
            port,
            identifier=self.client_id,
            username=username,
            password=password,
            protocol=(
                aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
            ),
            tls_context=tls_context,
            clean_session=None if protocol == "5" else True,
            timeout=timeout,
        )
        self._pending: dict[bytes, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None
        # Replies that matched no waiting call: late duplicates of a retried
        # request, or replies meant for another client on a shared topic.
        self.discarded = 0

    def __repr__(self) -> str:  # never the key
        return f"ProvisiondClient({self.host!r}, {self.port}, prefix={self.prefix!r})"

    async def __aenter__(self) -> ProvisiondClient:
        try:
            await self._mqtt.__aenter__()
        except aiomqtt.MqttError as exc:
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        try:
            granted = await self._mqtt.subscribe(self.reply_topic, qos=1)
            # A broker that refuses the subscription (some ACL backends do;
            # mosquitto grants it and delivers nothing) would turn every call
            # into a timeout: say so now instead.
            for granted_code in granted:
                code = granted_code if isinstance(granted_code, int) else granted_code.value
                if code >= 0x80:
                    raise ConnectionFailed(
                        f"the broker refused the subscription to {self.reply_topic} "
                        f"(reason 0x{code:02x}); does its ACL let this account read it?"
                    )
        except BaseException as exc:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._mqtt.__aexit__(None, None, None)
            if isinstance(exc, aiomqtt.MqttError):
                raise ConnectionFailed(f"cannot subscribe to {self.reply_topic}: {exc}") from None
            raise
        self._reader = asyncio.create_task(self._read(), name="provisiond-client-replies")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        with contextlib.suppress(aiomqtt.MqttError):
            await self._mqtt.__aexit__(None, None, None)

    async def _read(self) -> None:
        try:
            async for message in self._mqtt.messages:
                self._deliver(message)
        except aiomqtt.MqttError as exc:
            self._broken = exc
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionFailed(f"connection lost: {exc}"))

    def _deliver(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        try:
            envelope = json.loads(payload if isinstance(payload, bytes | bytearray | str) else b"")
        except ValueError:
            self.discarded += 1
            return
        if not isinstance(envelope, dict) or not isinstance(envelope.get("status"), int):
            self.discarded += 1
            return
        if self.protocol == "5":
            corr = getattr(message.properties, "CorrelationData", None)
            token = bytes(corr) if corr is not None else None
        else:
            cid = envelope.pop("correlation_id", None)
            token = cid.encode() if isinstance(cid, str) else None
        fut = self._pending.get(token) if token is not None else None
        if fut is None or fut.done():
            self.discarded += 1
            return
        body, error = envelope.get("body"), envelope.get("error")
        fut.set_result(
            Reply(
                envelope["status"],
                body if isinstance(body, dict) else None,
                error if isinstance(error, dict) else None,
            )
        )

    # --- calling

    async def call(
        self,
        operation: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - retries are spread within it
        retries: int | None = None,
        correlation: bytes | None = None,
    ) -> Reply:
        """Send one request and return its reply envelope, whatever its status.

        The request is published up to `retries + 1` times, evenly spread over
        `timeout`, each time with the same correlation data, so every copy after
        the first is a replay the daemon answers without doing anything again.
        """
        if self._reader is None:
            raise ClientError("use the client as `async with ProvisiondClient(...) as c:`")
        if self._broken is not None:
            raise ConnectionFailed(f"connection lost: {self._broken}")
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        correlation = correlation or secrets.token_bytes(CORRELATION_BYTES)
        payload, props, token = self._encode(body or {}, correlation, timeout)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        topic = f"{self.prefix}/rpc/{operation}"
        attempts = 0
        interval = timeout / (retries + 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                attempts += 1
                try:
                    await self._mqtt.publish(topic, payload, qos=1, properties=props)
                except aiomqtt.MqttError as exc:
                    raise ConnectionFailed(f"cannot publish {operation}: {exc}") from None
                wait = interval if attempts <= retries else deadline - loop.time()
                done, _ = await asyncio.wait({fut}, timeout=max(0.0, wait))
                if done:
                    return fut.result()
                if loop.time() >= deadline:
                    raise CallTimeout(operation, timeout, attempts)
        finally:
            self._pending.pop(token, None)
            if not fut.done():
                fut.cancel()

    async def request(
        self, operation: str, body: dict[str, Any] | None = None, **options: Unpack[CallOptions]
    ) -> dict[str, Any]:
        """Call `operation` and return the reply body; an error reply raises RpcError.
        `options`: those of `call`."""
        reply = await self.call(operation, body, **options)
        return reply.raise_for_status(operation)

    def _encode(
        self, body: dict[str, Any], correlation: bytes, timeout: float
    ) -> tuple[bytes, Properties | None, bytes]:
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
            if self._key is not None:
                props.UserProperty = [("authorization", f"Bearer {self._key}")]
            # A request nobody picks up in time is dropped by the broker rather
            # than answered long after the caller gave up.
            props.MessageExpiryInterval = max(1, math.ceil(timeout))
            return json.dumps(body).encode(), props, correlation
        correlation_id = correlation.hex()
        extra: dict[str, Any] = {"reply_to": self.reply_topic, "correlation_id": correlation_id}
        if self._key is not None:
            extra["authorization"] = f"Bearer {self._key}"
        return json.dumps({**body, **extra}).encode(), None, correlation_id.encode()

    # --- one method per operation (names and fields: OPERATIONS)

    async def keys_whoami(self) -> dict[str, Any]:
        """The calling key: `key_id`, `org_id`, `user_id`, `scopes`, `permissions`."""
        return await self.request("keys/whoami")

    async def daemon_stats(self) -> dict[str, Any]:
        """Uptime, broker connection, counters (scope `daemon:read`)."""
        return await self.request("daemon/stats")

    async def wifi_config_grant(
        self,
        device_id: int | str,
        *,
        expires_in_seconds: int | None = None,
        app_public_key: str | None = None,
        device_nonce: str | None = None,
    ) -> dict[str, Any]:
        """A signed WiFi grant for a device (scope `devices:write`)."""
        return await self.request(
            "wifi-config/grant",
            _body(
                device_id=device_id,
                expires_in_seconds=expires_in_seconds,
                app_public_key=app_public_key,
                device_nonce=device_nonce,
            ),
        )

    async def wifi_config_keys(self) -> dict[str, Any]:
        """The grant verification keys as JWKs (scope `devices:read`)."""
        return await self.request("wifi-config/keys")

    async def wifi_config_upload(
        self,
        device_id: int | str,
        *,
        ssid: str,
        password: str,
        security: Literal["open", "wpa2-psk", "wpa2-wpa3", "wpa3-sae"] | None = None,
        timeout_seconds: float | None = None,
    ) -> dict[str, Any]:
        """BLE bridge plugin: upload WiFi credentials to a nearby device (scope `devices:write`).

        The call's own timeout is raised to cover the upload's.
        """
        body = _body(
            device_id=device_id,
            ssid=ssid,
            password=password,
            security=security,
            timeout_seconds=timeout_seconds,
        )
        wait = max(self.timeout, (timeout_seconds or 120.0) + 5.0)
        return await self.request("wifi-config/upload", body, timeout=wait)

    async def provision_token(self, *, org_id: int, owner_id: int) -> dict[str, Any]:
        """Create a pending device and its provision token: `token`, `deviceId`."""
        return await self.request("provision/token", {"orgId": org_id, "ownerId": owner_id})

    async def provision_reprovision_token(self, device_id: int) -> dict[str, Any]:
        """A new provision token for an existing device; earlier ones are revoked."""
        return await self.request("provision/reprovision/token", {"deviceId": device_id})

    async def provision_reconfigure(self, device_id: int) -> dict[str, Any]:
        """Queue a reconfigure command: `deviceIsOffline`, `commandId`."""
        return await self.request("provision/reconfigure", {"deviceId": device_id})

    async def device_activate(
        self,
        *,
        token: str,
        capabilities: int,
        public_key: str,
        firmware_version: str | None = None,
        csr: str | None = None,
    ) -> dict[str, Any]:
        """A device spends its provision token (no API key needed); with `csr` (PEM, P-256)
        the reply also carries its client `certificate`."""
        return await self.request(
            "device/activate",
            _body(
                token=token,
                capabilities=capabilities,
                public_key=public_key,
                firmware_version=firmware_version,
                csr=csr,
            ),
        )

    async def device_decommission(self, device_id: int) -> dict[str, Any]:
        """Take a device out of service (broker account, tokens, commands, presence): `state`."""
        return await self.request("device/decommission", {"deviceId": device_id})

    async def device_get(self, device_id: int) -> dict[str, Any]:
        """One device, with presence (scope `devices:read`)."""
        return await self.request("device/get", {"deviceId": device_id})

    async def device_list(
        self, *, limit: int | None = None, after: int | None = None
    ) -> dict[str, Any]:
        """A page of devices: `devices`, and `next` to pass as `after` (scope `devices:read`)."""
        return await self.request("device/list", _body(limit=limit, after=after))


def _body(**fields: Any) -> dict[str, Any]:
    # Absent, not null: the daemon's bodies are strict and null is not a default.
    return {k: v for k, v in fields.items() if v is not None}
