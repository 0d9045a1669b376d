"""The BLE bridge: the gateway uploads WiFi credentials to a nearby device itself.

`P/rpc/wifi-config/upload` (scope `devices:write`) runs the whole flow of
docs/ble-gatt.md in bridge mode: find the device's advertisement, connect,
read Device Info, ask the GrantService for a grant bound to the device's
nonce with an ephemeral key made here, write the grant and the encrypted
credentials, and wait for the device's final status. The password exists
only in this request's memory; it is never logged, stored or published.

While it runs, the bridge scans continuously and reports presence channel
`ble` for every device it hears (offline after `presence_timeout_seconds`
of silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from provisiond.devices import Device, DeviceIdOrDecimal
from provisiond.errors import (
    BadRequest,
    Conflict,
    GatewayTimeout,
    RpcError,
    Unavailable,
)
from provisiond.payloads import REASON_CODE
from provisiond.plugins import PluginContext
from provisiond.rpc import Body, Operation, Request
from provisiond.wifi.crypto import (
    InvalidCredentials,
    WifiCryptoError,
    b64url_decode,
    credential_plaintext,
)
from provisiond.wifi.service import GrantService
from provisiond.wifi.uploader import Uploader, UploaderError
from provisiond_ble import profile
from provisiond_ble.central import BleError, GattSession, Radio

# Re-sending the same credentials cannot fix these; a retry would only cost time.
NO_RETRY: Final = frozenset({"wrong_password", "bad_credentials"})
SWEEP_INTERVAL: Final = 1.0


class BadGateway(RpcError):
    """The device answered, but not as the profile says it must."""

    status = 502
    code = "device_protocol_error"


class BleBridgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # bumble transport: "usb:0", "hci-socket:0", "serial:/dev/ttyUSB0,1000000",
    # or "local:NAME" for an in-memory link registered in central.LOCAL_LINKS.
    transport: str = Field(default="usb:0", min_length=1)
    # Our random static address; empty: a new random one at every start.
    address: str = ""
    # A device unheard for this long is offline on channel "ble" and must be
    # heard again before an upload connects to it.
    presence_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    default_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    max_timeout_seconds: float = Field(default=120.0, gt=0, le=600)
    grant_expires_in_seconds: int = Field(default=120, ge=60, le=3600)
    # One more attempt with a fresh grant after a failure (not after
    # wrong_password or bad_credentials, which a retry cannot fix).
    retry_on_failure: bool = False


class UploadBody(Body):
    device_id: DeviceIdOrDecimal
    ssid: str = Field(max_length=64)
    # repr=False: the body never shows its password in a traceback or a log.
    password: str = Field(max_length=256, repr=False)
    security: Literal["open", "wpa2-psk", "wpa2-wpa3", "wpa3-sae"] = "wpa2-psk"
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] | None = None


@dataclass
class Outcome:
    state: str
    grant_id: str
    reason: str | None = None
    stage: str = "wifi"

    def reply(self, attempts: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "state": self.state,
            "grant_id": self.grant_id,
            "attempts": attempts,
        }
        if self.reason is not None:
            body["reason"] = self.reason
            body["stage"] = self.stage
        return body


@dataclass
class _Progress:
    """Where an upload is (for the timeout reply) and how long each step took (for the log)."""

    _stage: str = "scan"
    _since: float = field(default_factory=time.perf_counter)
    phases_ms: dict[str, float] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        now = time.perf_counter()
        spent = (now - self._since) * 1000
        self.phases_ms[self._stage] = round(self.phases_ms.get(self._stage, 0.0) + spent, 1)
        self._stage, self._since = value, now


class BleBridgePlugin:
    name: ClassVar[str] = "ble_bridge"
    Config: ClassVar[type[BaseModel]] = BleBridgeConfig

    def __init__(self) -> None:
        self.ctx: PluginContext | None = None
        self.radio: Radio | None = None
        self._busy: set[int] = set()
        self._presence: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()
        self._online: set[int] = set()
        # Test hook and diagnostics: the last grant id per device (never the blob).
        self.last_grant_id: dict[int, str] = {}
        # iat of the last grant we gave each device (see _wait_for_fresh_iat).
        self._last_iat: dict[int, int] = {}

    @property
    def config(self) -> BleBridgeConfig:
        assert self.ctx is not None
        cfg: BleBridgeConfig = self.ctx.config
        return cfg

    async def start(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        # Registered first, so the operation exists (answering 503) even if
        # the radio fails to open and the plugin waits for its retry.
        ctx.register_operation(
            Operation("wifi-config/upload", self._upload, body=UploadBody, scope="devices:write")
        )
        radio = await Radio.open(self.config.transport, self.config.address)
        self.radio = radio
        radio.on_sighting = lambda device_id, online: self._presence.put_nowait((device_id, online))
        await radio.start()
        ctx.spawn(self._report_presence(), name="presence")
        ctx.spawn(self._sweep(), name="sweep")
        ctx.log.info("ble.started", transport=self.config.transport)

    async def stop(self) -> None:
        radio, self.radio = self.radio, None
        if radio is not None:
            await radio.close()
        # We no longer hear anything, so nothing may stay online on our channel.
        if self.ctx is not None:
            for device_id in sorted(self._online):
                with contextlib.suppress(Exception):
                    await self.ctx.presence.set_channel(device_id, "ble", False)
        self._online.clear()

    # ---- presence

    async def _report_presence(self) -> None:
        assert self.ctx is not None
        while True:
            device_id, online = await self._presence.get()
            if online == (device_id in self._online):
                continue
            (self._online.add if online else self._online.discard)(device_id)
            await self.ctx.presence.set_channel(device_id, "ble", online)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL, self.config.presence_timeout_seconds / 2))
            if self.radio is not None:
                for device_id in self.radio.expire(self.config.presence_timeout_seconds):
                    self._presence.put_nowait((device_id, False))

    # ---- upload

    async def _upload(self, request: Request, body: UploadBody) -> dict[str, Any]:
        ctx = self.ctx
        assert ctx is not None and request.principal is not None
        principal = request.principal
        device_id = body.device_id
        request.log_fields["device"] = device_id
        try:
            credential_plaintext(body.ssid, body.password, body.security)
        except InvalidCredentials as exc:
            raise BadRequest(exc.message, code="invalid_field", field=exc.field) from None

        grants = ctx.grants
        if grants is None or self.radio is None:
            raise Unavailable("the grant service is not running", code="grants_unavailable")
        # Everything that can be refused from the store is refused before any BLE traffic.
        device = await grants.grantable(
            org_id=principal.org_id, device_id=device_id, principal=principal
        )
        if device_id in self._busy:
            raise Conflict(f"an upload to device {device_id} is in progress", code="device_busy")

        timeout = min(
            body.timeout_seconds or self.config.default_timeout_seconds,
            self.config.max_timeout_seconds,
        )
        progress = _Progress()
        started = time.perf_counter()
        self._busy.add(device_id)
        try:
            async with asyncio.timeout(timeout):
                attempts = 1
                outcome = await self._attempt(request, device, body, grants, progress)
                if (
                    outcome.state == "failed"
                    and self.config.retry_on_failure
                    and outcome.reason not in NO_RETRY
                ):
                    attempts = 2
                    ctx.log.info("ble.retry", device=device_id, reason=outcome.reason)
                    outcome = await self._attempt(request, device, body, grants, progress)
        except TimeoutError:
            if progress.stage == "scan":
                raise GatewayTimeout(
                    f"device {device_id} was not heard within {timeout:g} s",
                    code="device_not_in_range",
                ) from None
            raise GatewayTimeout(
                f"device {device_id} did not finish within {timeout:g} s (at {progress.stage})",
                code="device_timeout",
            ) from None
        except BleError as exc:
            if exc.reason in ("device_unreachable",):
                raise GatewayTimeout(str(exc), code=exc.reason) from None
            raise BadGateway(str(exc), code=exc.reason) from None
        finally:
            self._busy.discard(device_id)
        request.log_fields["grant_id"] = outcome.grant_id
        request.log_fields["state"] = outcome.state
        request.log_fields["ble_ms"] = round((time.perf_counter() - started) * 1000, 1)
        progress.stage = "done"
        request.log_fields["phases_ms"] = progress.phases_ms
        if outcome.reason is not None:
            request.log_fields["reason"] = outcome.reason
        return outcome.reply(attempts)

    async def _attempt(
        self,
        request: Request,
        device: Device,
        body: UploadBody,
        grants: GrantService,
        progress: _Progress,
    ) -> Outcome:
        device_id, public_key = device.id, device.public_key
        radio = self.radio
        if radio is None:
            raise Unavailable("the BLE radio is not running", code="plugin_unavailable")
        assert request.principal is not None
        progress.stage = "scan"
        sighting = await radio.find(device_id, self.config.presence_timeout_seconds)
        progress.stage = "connect"
        connection = await radio.connect(sighting.address, self.config.max_timeout_seconds)
        session = GattSession(connection)
        try:
            progress.stage = "gatt_setup"
            await session.setup()
            progress.stage = "device_info"
            info = await session.device_info()
            try:
                advertised_key = b64url_decode(str(info.get("public_key")))
                nonce = b64url_decode(str(info.get("nonce")))
            except ValueError:
                raise BleError("bad_device_info", "public_key or nonce is not base64url") from None
            if info.get("device_id") != device_id or advertised_key != public_key:
                # Someone advertising this id without its key: no grant for it.
                raise Conflict(
                    f"the device advertising id {device_id} does not hold its registered key",
                    code="device_key_mismatch",
                )
            progress.stage = "grant_issue"
            await self._wait_for_fresh_iat(device_id)
            ephemeral = X25519PrivateKey.generate()
            grant = grants.issue_for(
                device,
                expires_in=self.config.grant_expires_in_seconds,
                app_public_key=ephemeral.public_key().public_bytes_raw(),
                device_nonce=nonce,
            )
            uploader = Uploader.for_grant(
                grant.grant_blob,
                ephemeral_private=ephemeral,
                device_public_key=public_key,
                grant_id=grant.jti,
                epk=grant.epk,
            )
            # Bridge mode: e lives only for this attempt (Python cannot wipe it).
            del ephemeral
            self.last_grant_id[device_id] = uploader.grant_id
            self._last_iat[device_id] = grant.iat
            progress.stage = "grant_write"
            await session.write_value(profile.WIFI_GRANT_UUID, grant.grant_blob.encode("ascii"))
            status = await self._next_status(session, uploader)
            if status["state"] != "grant-accepted":
                return Outcome(
                    "failed", uploader.grant_id, status.get("reason") or "grant_refused", "grant"
                )
            progress.stage = "credentials"
            message = uploader.credential_message(body.ssid, body.password, body.security)
            await session.write_value(profile.WIFI_CREDENTIAL_UUID, message)
            progress.stage = "wifi"
            while True:
                status = await self._next_status(session, uploader)
                if status["state"] in ("connected", "failed"):
                    stage = "credentials" if status.get("stage") == "credentials" else "wifi"
                    return Outcome(status["state"], uploader.grant_id, status.get("reason"), stage)
        finally:
            await session.close()

    async def _wait_for_fresh_iat(self, device_id: int) -> None:
        """Devices refuse a grant whose iat is not newer than the last one they
        accepted (whole seconds), so a second upload to the same device within
        one second would fail with stale_iat; wait for the next second instead."""
        assert self.ctx is not None
        last = self._last_iat.get(device_id)
        if last is None:
            return
        wait = last + 1 - self.ctx.app.clock.now()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _next_status(self, session: GattSession, uploader: Uploader) -> dict[str, str]:
        """The next status message the device sends, decrypted when sealed.

        Plaintext messages are refusals sent before a session key exists; they
        can only ever make an attempt fail, never succeed.
        """
        while True:
            message = await session.next_message()
            if not message:
                continue
            kind, rest = message[0], message[1:]
            if kind == profile.STATUS_SEALED:
                try:
                    return uploader.read_status(rest)
                except (WifiCryptoError, UploaderError) as exc:
                    raise BleError("status_unreadable", exc.__class__.__name__) from None
            if kind == profile.STATUS_PLAIN:
                doc = _plain(rest)
                if doc is not None and doc.get("state") == "failed":
                    return doc


def _plain(raw: bytes) -> dict[str, str] | None:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    reason = doc.get("reason")
    if reason is not None and not (isinstance(reason, str) and REASON_CODE.fullmatch(reason)):
        doc["reason"] = "unknown"
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str)}
