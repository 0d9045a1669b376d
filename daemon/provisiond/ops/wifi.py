"""WiFi configuration grants over RPC, and devices' reports of using them (docs/protocol.md §1, §2, §7).

- `P/rpc/wifi-config/grant` (scope devices:write): sign a grant.
- `P/rpc/wifi-config/keys` (scope devices:read): the public verification keys.
- `P/devices/N/wifi/status`: a device says it used a grant; the jti is
  recorded as consumed and `P/events/wifi/configured` or `.../failed` follows.

The work is in `provisiond.wifi.service.GrantService`, provided to other
features and to the BLE bridge as the service `GRANTS`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

from pydantic import Field, field_validator

from provisiond.devices import DeviceIdOrDecimal, find_device
from provisiond.logs import get_logger
from provisiond.payloads import REASON_CODE, json_object
from provisiond.presence import parse_device_id
from provisiond.rpc import Body, EmptyBody, Operation, Request, Router
from provisiond.runtime.app import App
from provisiond.transport import Delivery
from provisiond.wifi.crypto import b64url_decode
from provisiond.wifi.service import GRANTS, GrantService

log = get_logger("provisiond.wifi")

# A jti is b64url of 16 bytes (22 chars); allow some slack for other issuers
# but never an unbounded string into the database.
_GRANT_ID: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_STATUS_BYTES: Final = 1024


def _b64url_field(value: str, *, lo: int, hi: int) -> str:
    try:
        raw = b64url_decode(value)
    except ValueError as exc:
        raise ValueError(f"must be base64url without padding ({exc})") from None
    if not lo <= len(raw) <= hi:
        size = f"{lo} bytes" if lo == hi else f"{lo}..{hi} bytes"
        raise ValueError(f"must decode to {size}, got {len(raw)}")
    return value


class GrantBody(Body):
    device_id: DeviceIdOrDecimal
    # Strict: 900.5, "900", true and null are all refused, naming the field.
    expires_in_seconds: Annotated[int, Field(ge=60, le=3600)] = 900
    app_public_key: str | None = None
    device_nonce: str | None = None

    @field_validator("app_public_key")
    @classmethod
    def _app_public_key(cls, value: str | None) -> str | None:
        return None if value is None else _b64url_field(value, lo=32, hi=32)

    @field_validator("device_nonce")
    @classmethod
    def _device_nonce(cls, value: str | None) -> str | None:
        return None if value is None else _b64url_field(value, lo=8, hi=32)


class WifiGrants:
    """The grant operations and the devices' reports of using their grants."""

    def __init__(self, app: App, service: GrantService) -> None:
        self.app = app
        self.service = service
        self._unknown_reports = _PerDeviceBudget(UNKNOWN_REPORTS_PER_MINUTE)

    async def grant(self, request: Request, body: GrantBody) -> dict[str, Any]:
        """Sign a WiFi-configuration grant for an activated, WiFi-capable device.

        With `app_public_key` the session key is the requester's alone
        (end-to-end); without it the daemon makes one and returns it as
        `session_key` (server-generated mode, unless disabled).
        """
        assert request.principal is not None
        device_id = body.device_id
        request.log_fields["device"] = device_id
        expires_in = (
            body.expires_in_seconds if "expires_in_seconds" in body.model_fields_set else None
        )
        app_key = body.app_public_key
        nonce = body.device_nonce
        # A grant changes nothing in the store (it is stateless): its reply is
        # kept for replays by the router's batched buffer like any read-only
        # operation's.
        reply, result = await self.service.issue_reply(
            org_id=request.principal.org_id,
            device_id=device_id,
            principal=request.principal,
            expires_in=expires_in,
            app_public_key=None if app_key is None else b64url_decode(app_key),
            device_nonce=None if nonce is None else b64url_decode(nonce),
        )
        request.log_fields["mode"] = result.mode
        request.log_fields["grant_id"] = result.jti
        return reply

    async def keys(self, _request: Request, _body: EmptyBody) -> dict[str, Any]:
        """The gateway's public grant verification keys (JWKs), active first."""
        return {"keys": self.service.public_jwks()}

    async def wifi_status(self, delivery: Delivery, values: list[str]) -> None:
        """A device reports the outcome of a grant it accepted (`P/devices/N/wifi/status`)."""
        app, service = self.app, self.service
        report = _parse_status(values[0], delivery.payload)
        if report is None:
            app.counters["wifi.status.malformed"] += 1
            return
        device_id, grant_id, state, reason = report
        known = service.issued_by_us(grant_id)
        if known is not None and known[0] != device_id:
            # A device may only spend its own grants (the broker ACL pins it to its topic).
            app.counters["wifi.status.wrong_device"] += 1
            return
        device = await app.store.call(lambda db: find_device(db, device_id))
        if device is None or not device.active:
            app.counters["wifi.status.unknown_device"] += 1
            return
        if known is None and not self._unknown_reports.allow(device_id, app.clock.monotonic()):
            # Grant ids this process did not issue (e.g. before a restart) cannot
            # be checked; a device inventing them would fill the ledger and the
            # event stream, so each device gets only a few per minute.
            app.counters["wifi.status.rate_limited"] += 1
            return
        # A failed attempt spends the grant too: the device accepted it and
        # will refuse it again, so the bridge must not offer it a second time.
        new = await service.record_consumed(
            device_id, grant_id, service.exp_for(grant_id), state=state
        )
        if not new:
            # A redelivery or repeat: the event for this grant went out already.
            app.counters["wifi.status.duplicate"] += 1
            return
        app.counters[f"wifi.status.{state}"] += 1
        log.info("wifi.status", device=device_id, grant_id=grant_id, state=state, reason=reason)
        if state == "connected":
            await app.publish_event(
                "wifi/configured", {"device_id": device_id, "grant_id": grant_id}
            )
        else:
            await app.publish_event(
                "wifi/failed", {"device_id": device_id, "grant_id": grant_id, "reason": reason}
            )


def setup(app: App, router: Router) -> None:
    """Issue grants and take the devices' reports; provides GRANTS."""
    service = GrantService(app)
    app.services.provide(GRANTS, service)
    ops = WifiGrants(app, service)

    async def start() -> None:
        await service.load_keys()
        app.spawn(service.prune_forever(), name="wifi-prune")

    app.on_start.append(start)
    app.on_reload.append(service.reload_keys)
    router.register(
        Operation("wifi-config/grant", ops.grant, body=GrantBody, scope="devices:write")
    )
    router.register(Operation("wifi-config/keys", ops.keys, scope="devices:read"))
    app.route("devices/+/wifi/status", ops.wifi_status, qos=1)


UNKNOWN_REPORTS_PER_MINUTE = 10


class _PerDeviceBudget:
    """A token bucket per device (only devices found active get one, so the
    map is bounded by the fleet, not by what anyone publishes)."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[int, tuple[float, float]] = {}

    def allow(self, device_id: int, now: float) -> bool:
        tokens, last = self._buckets.get(device_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - 1, now)
        return True


def _parse_status(segment: str, payload: bytes) -> tuple[int, str, str, str | None] | None:
    """(device_id, grant_id, state, reason) of a well-formed report, else None.

    Reasons must be machine codes: free text is how an SSID or a password
    would find its way from a device into our logs and events.
    """
    device_id = parse_device_id(segment)
    if device_id is None or len(payload) > MAX_STATUS_BYTES:
        return None
    doc = json_object(payload)
    if doc is None:
        return None
    grant_id, state, reason = doc.get("grant_id"), doc.get("state"), doc.get("reason")
    if not isinstance(grant_id, str) or not _GRANT_ID.fullmatch(grant_id):
        return None
    if state not in ("connected", "failed"):
        return None
    if reason is not None and (not isinstance(reason, str) or not REASON_CODE.fullmatch(reason)):
        return None
    if state == "failed" and reason is None:
        reason = "unknown"
    return device_id, grant_id, str(state), None if state == "connected" else reason
