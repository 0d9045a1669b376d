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

from typing import Any

import sqlite_utils

from provisiond import permissions, tokens
from provisiond.app import App
from provisiond.broker_accounts import BrokerAccounts, certificates
from provisiond.broker_accounts.feature import accounts_of, device_lock, refresh_crl
from provisiond.devices import Device
from provisiond.logs import get_logger
from provisiond.mqtt import PublishRefused
from provisiond.ops.devices import DeviceId
from provisiond.rpc import Body, Operation, Request, Router
from provisiond.transport import NotConnected

log = get_logger("provisiond.decommission")

DECOMMISSIONED = "decommissioned"


class DecommissionBody(Body):
    deviceId: DeviceId


def decommission_in_store(db: sqlite_utils.Database, device_id: int, *, now: float) -> int:
    """Step 2, inside the caller's transaction; returns how many commands were dropped."""
    tokens.revoke_unused(db, device_id, now=now)
    certificates.revoke(db, device_id, now=now)
    dropped = db.execute(
        "UPDATE commands SET state = 'dropped' WHERE device_id = ? AND state IN ('queued', 'sent')",
        [device_id],
    ).rowcount
    db.execute("DELETE FROM presence WHERE device_id = ?", [device_id])
    db.execute("UPDATE devices SET state = ? WHERE id = ?", [DECOMMISSIONED, device_id])
    return int(dropped)


async def delete_account(accounts: BrokerAccounts | None, device_id: int) -> None:
    if accounts is not None:
        await accounts.delete(device_id)


def setup(app: App, router: Router) -> None:
    async def decommission(request: Request, body: DecommissionBody) -> dict[str, Any]:
        principal = request.principal
        assert principal is not None
        device_id = body.deviceId
        request.log_fields["device"] = device_id
        # Refusals (403/404) before the broker is touched.
        await app.store.call(lambda db: permissions.provisionable_device(db, principal, device_id))
        now = app.clock.now()
        seen: list[tuple[Device, int]] = []

        def tx(db: sqlite_utils.Database) -> dict[str, Any]:
            device = permissions.provisionable_device(db, principal, device_id)
            dropped = decommission_in_store(db, device_id, now=now)
            seen.append((device, dropped))
            return {"deviceId": device_id, "state": DECOMMISSIONED}

        try:
            async with device_lock(app, device_id):
                await delete_account(accounts_of(app), device_id)
                result = await request.write(tx)
        finally:
            app.devices.forget(device_id)
        device, dropped = seen[0]
        await forget_presence(app, device_id)
        # On the CRL for the broker's next reload (see broker_accounts/certificates.py).
        await refresh_crl(app)
        log.info("device.decommissioned", device=device_id, commands_dropped=dropped)
        await app.publish_event(
            "device/decommissioned",
            {"deviceId": device_id, "orgId": device.org_id, "ownerId": device.owner_id},
        )
        return result

    router.register(
        Operation(
            "device/decommission", decommission, body=DecommissionBody, scope="provision:write"
        )
    )


async def forget_presence(app: App, device_id: int) -> None:
    """Step 3: out of the in-memory presence, and no retained message left on the broker."""
    presence = app.services.get("presence")
    if presence is not None:
        presence.device_removed(device_id)
    try:
        await app.transport.publish(
            app.topic("devices", device_id, "presence"), b"", qos=1, retain=True
        )
    except (NotConnected, PublishRefused) as exc:
        # The row is gone, so a restart publishes nothing for it either; only
        # the broker's retained copy outlives this until cleared by hand.
        log.warning("decommission.presence_not_cleared", device=device_id, error=str(exc))
