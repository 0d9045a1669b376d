"""`P/rpc/device/decommission {"deviceId"}`: a device leaves service, and its row stays for audit.

Same permission rules as `provision/reprovision/token`. In order:

1. the broker account is deleted, which disconnects a connected device (with
   the `none` backend there is nothing to delete). The broker goes first: if
   it cannot be asked, the reply is 503 and nothing has changed; and once the
   reply says 200, the device can no longer connect.
2. one transaction: live tokens and certificates revoked, queued and sent commands `dropped`,
   the presence row deleted, state `decommissioned` (the reply is recorded
   for replays in it too);
3. the device leaves the in-memory presence, and its retained presence
   message is cleared (an empty retained publish).

Doing it twice answers the same. `provision/reprovision/token` brings the
device back (state `pending`, new token, new account).
`provisiond devices decommission ID` does the same from the shell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from provisiond import commands, devices, permissions, presence, tokens
from provisiond.auth import Principal
from provisiond.broker_accounts import certificates
from provisiond.broker_accounts.feature import BROKER_ACCOUNTS
from provisiond.devices import Device, DeviceId
from provisiond.logs import get_logger
from provisiond.presence import PRESENCE
from provisiond.rpc import Body, Operation, Request, Router
from provisiond.runtime.app import App
from provisiond.transport import NotConnected, PublishRefused

log = get_logger("provisiond.decommission")

DECOMMISSIONED = "decommissioned"


class DecommissionBody(Body):
    deviceId: DeviceId


@dataclass(frozen=True)
class Decommissioned:
    device: Device
    commands_dropped: int

    def reply(self) -> dict[str, Any]:
        return {"deviceId": self.device.id, "state": DECOMMISSIONED}


class Decommissioning:
    """The decommission operation (same permissions as a re-provision)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def decommission(self, request: Request, body: DecommissionBody) -> dict[str, Any]:
        """Take a device out of service: broker account deleted (and disconnected), tokens and
        certificates revoked, queued commands dropped, presence cleared; the row stays for audit.

        `device/get` then shows `state: decommissioned`; `provision/reprovision/token`
        brings the device back. Doing it twice answers the same.
        """
        app = self.app
        principal = request.principal
        assert principal is not None
        device_id = body.deviceId
        request.log_fields["device"] = device_id
        # Refusals (403/404) before the broker is touched.
        await app.store.call(lambda db: permissions.provisionable_device(db, principal, device_id))
        identity = app.services.find(BROKER_ACCOUNTS)
        try:
            if identity is None:
                done = await request.write(self._in_store(principal, device_id))
            else:
                async with identity.lock(device_id):
                    if identity.accounts is not None:
                        # First: once the reply says 200, the device cannot connect.
                        await identity.accounts.delete(device_id)
                    done = await request.write(self._in_store(principal, device_id))
        finally:
            app.caches.devices.forget(device_id)
        await self._forget_presence(device_id)
        if identity is not None:
            # On the CRL for the broker's next reload (see broker_accounts/certificates.py).
            await identity.refresh_crl()
        log.info("device.decommissioned", device=device_id, commands_dropped=done.commands_dropped)
        await app.publish_event(
            "device/decommissioned",
            {"deviceId": device_id, "orgId": done.device.org_id, "ownerId": done.device.owner_id},
        )
        return done.reply()

    def _in_store(self, principal: Principal, device_id: int) -> _Tx:
        now = self.app.clock.now()

        def tx(db: sqlite_utils.Database) -> Decommissioned:
            device = permissions.provisionable_device(db, principal, device_id)
            tokens.revoke_unused(db, device_id, now=now)
            certificates.revoke(db, device_id, now=now)
            dropped = commands.drop_for_device(db, device_id)
            presence.forget_row(db, device_id)
            devices.mark_decommissioned(db, device_id)
            return Decommissioned(device, dropped)

        return tx

    async def _forget_presence(self, device_id: int) -> None:
        """Out of the in-memory presence, and no retained message left on the broker."""
        tracker = self.app.services.find(PRESENCE)
        if tracker is not None:
            tracker.device_removed(device_id)
        try:
            await self.app.transport.publish(
                self.app.topic("devices", device_id, "presence"), b"", qos=1, retain=True
            )
        except (NotConnected, PublishRefused) as exc:
            # The row is gone, so a restart publishes nothing for it either; only
            # the broker's retained copy outlives this until cleared by hand.
            log.warning("decommission.presence_not_cleared", device=device_id, error=str(exc))


_Tx = Callable[[sqlite_utils.Database], Decommissioned]


def setup(app: App, router: Router) -> None:
    """`device/decommission`; uses BROKER_ACCOUNTS and PRESENCE when they run."""
    ops = Decommissioning(app)
    router.register(
        Operation(
            "device/decommission", ops.decommission, body=DecommissionBody, scope="provision:write"
        )
    )
