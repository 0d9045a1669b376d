"""Provisioning (the provisioning seed, DESIGN §2, §5, §6).

- `provision/token`: create a pending device and its first provision token.
- `provision/reprovision/token`: a new token for an existing device; the
  earlier ones are revoked and every other field of the device is kept.
- `device/activate`: the device spends its token, reports its capabilities
  and X25519 public key, and learns what it needs to verify WiFi grants.

Each handler does all its writes in one `request.write`, so a refusal writes
nothing and a replay can never see half an effect. Events are published after
the commit, so a rolled-back request never announces anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import AfterValidator, Field

from provisiond import permissions, tokens
from provisiond.app import App
from provisiond.broker_accounts import MqttCredentials, certificates
from provisiond.broker_accounts import store as account_store
from provisiond.broker_accounts.certificates import MAX_CSR_CHARS
from provisiond.broker_accounts.feature import (
    IssuedCertificate,
    accounts_of,
    device_lock,
    provision_with_account,
    refresh_crl,
    sign_csr,
)
from provisiond.devices import Device, find_device
from provisiond.errors import BadRequest, Conflict, Unavailable
from provisiond.ops.devices import INT32_MAX, DeviceId, OrgId, UserId
from provisiond.rpc import Body, Operation, Request, Router
from provisiond.wifi.crypto import InvalidPeerKey, b64url_decode, x25519_shared

# (device_id) -> the JWKs a device needs to verify its grants; registered by
# the WiFi feature. Without it a device still activates, with no keys to pin.
GrantKeys = Callable[[int], list[dict[str, Any]]]


def _x25519_public_key(value: str) -> str:
    try:
        raw = b64url_decode(value)
    except ValueError:
        raise ValueError("must be base64url without padding") from None
    if len(raw) != 32:
        raise ValueError("must be a 32-byte X25519 public key")
    return value


def _refuse_low_order(raw: bytes) -> None:
    """A low-order point would make every session key derivable by anyone;
    refuse it at activation rather than at the device's first WiFi grant.
    Run only once the token is known good, and off the event loop: an
    unauthenticated flood must not buy a key agreement per request."""
    try:
        x25519_shared(X25519PrivateKey.generate(), raw)
    except InvalidPeerKey:
        raise BadRequest(
            "public_key is not a usable X25519 public key (low-order point)",
            code="invalid_field",
            field="public_key",
        ) from None


class ProvisionBody(Body):
    orgId: OrgId
    ownerId: UserId


class ReprovisionBody(Body):
    deviceId: DeviceId


class ActivateBody(Body):
    token: Annotated[str, Field(min_length=1, max_length=tokens.MAX_TOKEN_LENGTH)]
    capabilities: Annotated[int, Field(ge=0, le=INT32_MAX)]
    public_key: Annotated[str, Field(max_length=64), AfterValidator(_x25519_public_key)]
    # Printable text only: it ends up in operators' terminals and logs.
    firmware_version: (
        Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")] | None
    ) = None
    # broker_accounts.certificates: a PEM CSR (P-256) for the device's client certificate.
    csr: Annotated[str, Field(min_length=1, max_length=MAX_CSR_CHARS)] | None = None


def create_device(db: sqlite_utils.Database, *, org_id: int, owner_id: int, now: float) -> int:
    cur = db.execute(
        "INSERT INTO devices (org_id, owner_id, state, created_at) VALUES (?, ?, 'pending', ?)",
        [org_id, owner_id, now],
    )
    device_id = cur.lastrowid
    assert device_id is not None
    if device_id > INT32_MAX:
        # The seed's deviceId is int32; handing out a bigger one would break clients.
        raise Unavailable("device id space exhausted", code="device_ids_exhausted")
    return int(device_id)


def setup(app: App, router: Router) -> None:
    async def provision_token(request: Request, body: ProvisionBody) -> dict[str, Any]:
        principal = request.principal
        assert principal is not None
        permissions.check_provision(principal, org_id=body.orgId, owner_id=body.ownerId)
        now = app.clock.now()
        lifetime = app.config.tokens.lifetime_seconds

        def tx(db: sqlite_utils.Database) -> dict[str, Any]:
            permissions.check_owner_in_org(db, org_id=body.orgId, owner_id=body.ownerId)
            device_id = create_device(db, org_id=body.orgId, owner_id=body.ownerId, now=now)
            token = tokens.issue(db, device_id, now=now, lifetime=lifetime)
            return {"token": token, "deviceId": device_id}

        # broker_accounts: the device's own account is made before its row is
        # committed; see broker_accounts/feature.py for the ordering.
        accounts = accounts_of(app)
        if accounts is not None:

            def check(db: sqlite_utils.Database) -> None:
                permissions.check_owner_in_org(db, org_id=body.orgId, owner_id=body.ownerId)

            def commit(
                db: sqlite_utils.Database, device_id: int, creds: MqttCredentials
            ) -> dict[str, Any]:
                account_store.insert_reserved_device(
                    db, device_id=device_id, org_id=body.orgId, owner_id=body.ownerId, now=now
                )
                token = tokens.issue(db, device_id, now=now, lifetime=lifetime)
                return {"token": token, "deviceId": device_id, "mqtt": creds.reply()}

            result = await provision_with_account(
                app, accounts, request.write, check=check, commit=commit
            )
            request.log_fields["device"] = result["deviceId"]
            return result

        result = await request.write(tx)
        request.log_fields["device"] = result["deviceId"]
        return result

    async def reprovision_token(request: Request, body: ReprovisionBody) -> dict[str, Any]:
        principal = request.principal
        assert principal is not None
        request.log_fields["device"] = body.deviceId
        now = app.clock.now()
        lifetime = app.config.tokens.lifetime_seconds
        seen: list[Device] = []
        accounts = accounts_of(app)
        creds: list[MqttCredentials] = []
        revoked: list[int] = []

        def tx(db: sqlite_utils.Database) -> dict[str, Any]:
            # Revoke and issue in one BEGIN IMMEDIATE transaction on the single
            # store thread: concurrent re-provisions serialise, and the last one
            # leaves the only live token.
            device = permissions.provisionable_device(db, principal, body.deviceId)
            token = tokens.issue(db, device.id, now=now, lifetime=lifetime)
            db.execute("UPDATE devices SET reprovisioned_at = ? WHERE id = ?", [now, device.id])
            # A decommissioned device comes back as a new, pending one.
            db.execute(
                "UPDATE devices SET state = 'pending' WHERE id = ? AND state = 'decommissioned'",
                [device.id],
            )
            # Its certificates end with its old token, as its password does.
            revoked.append(certificates.revoke(db, device.id, now=now))
            seen.append(device)
            reply: dict[str, Any] = {"token": token, "deviceId": device.id}
            if creds:
                reply["mqtt"] = creds[0].reply()
            return reply

        try:
            # broker_accounts: the password and the token change together.
            async with device_lock(app, body.deviceId):
                if accounts is not None:
                    # Refusals (403/404) before the broker is touched; the new
                    # password (the old one dies now: see broker_accounts/feature.py)
                    # before the commit.
                    await app.store.call(
                        lambda db: permissions.provisionable_device(db, principal, body.deviceId)
                    )
                    creds.append(await accounts.rotate(body.deviceId))
                result = await request.write(tx)
        finally:
            # Even if this task is cancelled mid-write: the commit may still land.
            app.devices.forget(body.deviceId)
        device = seen[0]
        if revoked[0]:
            await refresh_crl(app)
        await app.publish_event(
            "device/reprovisioned",
            {"deviceId": device.id, "orgId": device.org_id, "ownerId": device.owner_id},
        )
        return result

    async def activate(request: Request, body: ActivateBody) -> dict[str, Any]:
        now = app.clock.now()
        # Read first: refusals cost no write lock, and the device id is needed
        # to ask for its grant keys before the transaction (the service runs
        # on the event loop and may fail — then the token stays unspent).
        record = tokens.require_usable(
            await app.store.call(lambda db: tokens.find(db, body.token)), now
        )
        device_id = record.device_id
        request.log_fields["device"] = device_id
        public_key = b64url_decode(body.public_key)
        await asyncio.to_thread(_refuse_low_order, public_key)
        grant_keys: GrantKeys | None = app.services.get("grant_keys")
        jwks = list(grant_keys(device_id)) if grant_keys is not None else []
        issued: IssuedCertificate | None = None
        if body.csr is not None:
            issued = await sign_csr(app, device_id, body.csr)
        accounts = accounts_of(app)
        if accounts is not None:
            # Before the token is spent: a broker that is down fails activation
            # with the token intact, to be tried again.
            await accounts.activate(device_id)
        seen: list[Device] = []

        def tx(db: sqlite_utils.Database) -> dict[str, Any]:
            # Checked again under the write lock: a concurrent activation with the
            # same token may have spent it since the read above.
            if tokens.consume(db, body.token, now=now) != device_id:
                raise Conflict("provision token changed device", field="token")
            before = find_device(db, device_id)
            assert before is not None  # tokens reference devices, which are never deleted
            db.execute(
                "UPDATE devices SET state = 'active', capabilities = ?, public_key = ?,"
                " firmware_version = ?, activated_at = ? WHERE id = ?",
                [body.capabilities, public_key, body.firmware_version, now, device_id],
            )
            seen.append(before)
            reply: dict[str, Any] = {
                "deviceId": device_id,
                "gateway_id": app.config.daemon.gateway_id,
                "grant_verification_keys": jwks,
                "heartbeat_interval": app.config.presence.heartbeat_interval_seconds,
            }
            if issued is not None:
                issued.record(db, device_id, now)
                reply.update(issued.reply())
            return reply

        try:
            result = await request.write(tx)
        finally:
            # Even if this task is cancelled mid-write: the commit may still land.
            app.devices.forget(device_id)
        before = seen[0]
        presence = app.services.get("presence")
        if presence is not None:
            # Its first heartbeat then needs no store lookup to be recognised.
            presence.device_activated(device_id)
        await app.publish_event(
            "device/activated",
            {
                "deviceId": device_id,
                "orgId": before.org_id,
                "ownerId": before.owner_id,
                "capabilities": body.capabilities,
                "firmware_version": body.firmware_version,
                "reactivation": before.activated_at is not None,
            },
        )
        return result

    router.register(
        Operation("provision/token", provision_token, body=ProvisionBody, scope="provision:write")
    )
    router.register(
        Operation(
            "provision/reprovision/token",
            reprovision_token,
            body=ReprovisionBody,
            scope="provision:write",
        )
    )
    router.register(Operation("device/activate", activate, body=ActivateBody, auth="body_token"))
