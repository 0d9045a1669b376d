"""Provisioning (the provisioning seed, docs/protocol.md §2, §4, §6).

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
from dataclasses import dataclass, field
from typing import Annotated, Any

import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import AfterValidator, Field

from provisiond import devices, permissions, tokens
from provisiond.auth import Principal
from provisiond.broker_accounts import MqttCredentials, certificates
from provisiond.broker_accounts import store as account_store
from provisiond.broker_accounts.certificates import MAX_CSR_CHARS
from provisiond.broker_accounts.feature import BROKER_ACCOUNTS, IssuedCertificate
from provisiond.devices import INT32_MAX, Device, DeviceId, OrgId, UserId
from provisiond.errors import BadRequest, Conflict
from provisiond.presence import PRESENCE
from provisiond.rpc import Body, Operation, Request, Router
from provisiond.runtime.app import App
from provisiond.wifi.crypto import InvalidPeerKey, b64url_decode, x25519_shared
from provisiond.wifi.service import GRANTS


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
    # A PEM CSR (P-256) for the device's client certificate (docs/broker-accounts.md).
    csr: Annotated[str, Field(min_length=1, max_length=MAX_CSR_CHARS)] | None = None


@dataclass(frozen=True)
class Issued:
    """A provision token just issued for a device (a new or a re-provisioned one)."""

    device_id: int
    org_id: int
    owner_id: int
    token: str = field(repr=False)
    # The device's own broker account, when provisiond manages them.
    mqtt: MqttCredentials | None = None
    certificates_revoked: int = 0

    def reply(self) -> dict[str, Any]:
        body: dict[str, Any] = {"token": self.token, "deviceId": self.device_id}
        if self.mqtt is not None:
            body["mqtt"] = self.mqtt.reply()
        return body


@dataclass(frozen=True)
class Activated:
    """An activation: the device as it was before, and what the device is told."""

    before: Device
    body: dict[str, Any] = field(repr=False)

    def reply(self) -> dict[str, Any]:
        return self.body


class Provisioning:
    """The provisioning operations; one instance per daemon."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def provision_token(self, request: Request, body: ProvisionBody) -> dict[str, Any]:
        """Create a pending device owned by `ownerId` in `orgId`, and its first provision token.

        The token is shown once, here; the store keeps only its hash. With
        managed broker accounts the reply also carries the device's own broker
        credentials (`mqtt`), made before the device is committed. User-scoped
        keys need PROVISION_DEVICES, plus ORG_VIEW_USERS to provision for another user.
        """
        principal = request.principal
        assert principal is not None
        permissions.check_provision(principal, org_id=body.orgId, owner_id=body.ownerId)
        now = self.app.clock.now()
        lifetime = self.app.config.tokens.lifetime_seconds
        identity = self.app.services.find(BROKER_ACCOUNTS)
        accounts = None if identity is None else identity.accounts
        if identity is None or accounts is None:

            def unknown_owner() -> Exception:
                return permissions.unknown_owner(org_id=body.orgId, owner_id=body.ownerId)

            def tx(db: sqlite_utils.Database) -> Issued:
                # The owner check is part of the device's INSERT: on PostgreSQL
                # the whole write is then sent without waiting for the server.
                device_id = devices.create_device(
                    db, org_id=body.orgId, owner_id=body.ownerId, now=now, owner_check=unknown_owner
                )
                token = tokens.issue(db, device_id, now=now, lifetime=lifetime, new_device=True)
                return Issued(device_id, body.orgId, body.ownerId, token)

            # Pipelined: nothing but the store is touched, so it may run again.
            issued = await request.write(tx, pipelined=True)
        else:

            def check(db: sqlite_utils.Database) -> None:
                permissions.check_owner_in_org(db, org_id=body.orgId, owner_id=body.ownerId)

            def commit(db: sqlite_utils.Database, device_id: int, creds: MqttCredentials) -> Issued:
                account_store.claim_reservation(db, device_id)
                devices.create_device(
                    db, org_id=body.orgId, owner_id=body.ownerId, now=now, device_id=device_id
                )
                token = tokens.issue(db, device_id, now=now, lifetime=lifetime)
                return Issued(device_id, body.orgId, body.ownerId, token, creds)

            # The account first, then one commit of device, token and reply:
            # see broker_accounts/feature.py for the ordering.
            issued = await identity.provision(accounts, request.write, check=check, commit=commit)
        request.log_fields["device"] = issued.device_id
        return issued.reply()

    async def reprovision_token(self, request: Request, body: ReprovisionBody) -> dict[str, Any]:
        """Issue a new provision token for an existing device, revoking its earlier ones.

        Everything else about the device is kept: its id, owner and history; a
        decommissioned device comes back as a pending one. With managed broker
        accounts the device gets a new password (`mqtt`): the old one stops
        working now, with the old token. The device activates again.
        """
        principal = request.principal
        assert principal is not None
        device_id = body.deviceId
        request.log_fields["device"] = device_id
        identity = self.app.services.find(BROKER_ACCOUNTS)
        accounts = None if identity is None else identity.accounts
        try:
            if identity is None:
                issued = await request.write(self._reissue(principal, device_id, None))
            else:
                async with identity.lock(device_id):
                    creds = None
                    if accounts is not None:
                        # Refusals (403/404) before the broker is touched.
                        await self.app.store.call(
                            lambda db: permissions.provisionable_device(db, principal, device_id)
                        )
                        creds = await accounts.rotate(device_id)
                    issued = await request.write(self._reissue(principal, device_id, creds))
        finally:
            # Even if this task is cancelled mid-write: the commit may still land.
            self.app.caches.devices.forget(device_id)
        if identity is not None and issued.certificates_revoked:
            await identity.refresh_crl()
        await self.app.publish_event(
            "device/reprovisioned",
            {"deviceId": issued.device_id, "orgId": issued.org_id, "ownerId": issued.owner_id},
        )
        return issued.reply()

    def _reissue(
        self, principal: Principal, device_id: int, creds: MqttCredentials | None
    ) -> Callable[[sqlite_utils.Database], Issued]:
        now = self.app.clock.now()
        lifetime = self.app.config.tokens.lifetime_seconds

        def tx(db: sqlite_utils.Database) -> Issued:
            # Revoke and issue in one BEGIN IMMEDIATE transaction on the single
            # store thread: concurrent re-provisions serialise, and the last one
            # leaves the only live token.
            device = permissions.provisionable_device(db, principal, device_id)
            token = tokens.issue(db, device.id, now=now, lifetime=lifetime)
            devices.mark_reprovisioned(db, device.id, now=now)
            # Its certificates end with its old token, as its password does.
            revoked = certificates.revoke(db, device.id, now=now)
            return Issued(device.id, device.org_id, device.owner_id, token, creds, revoked)

        return tx

    async def activate(self, request: Request, body: ActivateBody) -> dict[str, Any]:
        """A device spends its provision token and reports its capabilities and X25519 key.

        The reply carries its `deviceId`, the `grant_verification_keys` (JWKs)
        to pin, `gateway_id` and `heartbeat_interval`. Authenticated by the
        token in the body, not by an API key.
        """
        app = self.app
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
        grants = app.services.find(GRANTS)
        # Without the WiFi feature a device still activates, with no keys to pin.
        jwks = grants.verification_jwks(device_id) if grants is not None else []
        certificate = await self._broker_identity(device_id, body.csr)
        reply = {
            "deviceId": device_id,
            "gateway_id": app.config.daemon.gateway_id,
            "grant_verification_keys": jwks,
            "heartbeat_interval": app.config.presence.heartbeat_interval_seconds,
        }

        def tx(db: sqlite_utils.Database) -> Activated:
            # Checked again under the write lock: a concurrent activation with the
            # same token may have spent it since the read above.
            if tokens.consume(db, body.token, now=now) != device_id:
                raise Conflict("provision token changed device", field="token")
            before = devices.activate(
                db,
                device_id,
                capabilities=body.capabilities,
                public_key=public_key,
                firmware_version=body.firmware_version,
                now=now,
            )
            if certificate is not None:
                certificate.record(db, device_id, now)
                reply.update(certificate.reply())
            return Activated(before, reply)

        try:
            activated = await request.write(tx)
        finally:
            # Even if this task is cancelled mid-write: the commit may still land.
            app.caches.devices.forget(device_id)
        await self._announce(activated, body)
        return activated.reply()

    async def _broker_identity(self, device_id: int, csr: str | None) -> IssuedCertificate | None:
        """The device's account goes active (and its CSR is signed) before the token is
        spent: a broker that is down fails the activation with the token intact."""
        identity = self.app.services.find(BROKER_ACCOUNTS)
        if identity is None:
            if csr is not None:
                raise BadRequest(
                    "certificates are not enabled here", code="certificates_disabled", field="csr"
                )
            return None
        certificate = None if csr is None else await identity.sign_csr(device_id, csr)
        if identity.accounts is not None:
            await identity.accounts.activate(device_id)
        return certificate

    async def _announce(self, activated: Activated, body: ActivateBody) -> None:
        before = activated.before
        presence = self.app.services.find(PRESENCE)
        if presence is not None:
            # Its first heartbeat then needs no store lookup to be recognised.
            presence.device_activated(before.id)
        await self.app.publish_event(
            "device/activated",
            {
                "deviceId": before.id,
                "orgId": before.org_id,
                "ownerId": before.owner_id,
                "capabilities": body.capabilities,
                "firmware_version": body.firmware_version,
                "reactivation": before.activated_at is not None,
            },
        )


def setup(app: App, router: Router) -> None:
    ops = Provisioning(app)
    router.register(
        Operation(
            "provision/token", ops.provision_token, body=ProvisionBody, scope="provision:write"
        )
    )
    router.register(
        Operation(
            "provision/reprovision/token",
            ops.reprovision_token,
            body=ReprovisionBody,
            scope="provision:write",
        )
    )
    router.register(
        Operation("device/activate", ops.activate, body=ActivateBody, auth="body_token")
    )
