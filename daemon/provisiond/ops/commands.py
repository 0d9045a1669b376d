"""`P/rpc/provision/reconfigure` and the device-side `commands/ack` topic (DESIGN §2, §5, §6)."""

from __future__ import annotations

import secrets
from typing import Any

import sqlite_utils

from provisiond import devices, permissions
from provisiond.app import App
from provisiond.commands import RECONFIGURE, Commands, queue_command
from provisiond.errors import Conflict, NotFound
from provisiond.presence import Presence
from provisiond.rpc import Body, Operation, Request, Router

MAX_SQLITE_INT = 2**63 - 1


class ReconfigureBody(Body):
    deviceId: int  # the seed's field name


def new_command_id() -> str:
    return "cmd_" + secrets.token_hex(8)


def setup(app: App, router: Router) -> None:
    presence = app.services.get("presence")
    service = Commands(app, presence if isinstance(presence, Presence) else None)
    app.services["commands"] = service

    async def reconfigure(request: Request, body: ReconfigureBody) -> dict[str, Any]:
        principal = request.principal
        assert principal is not None
        permissions.check_provision_device(principal)
        device_id = permissions.positive_id(body.deviceId, "deviceId")
        request.log_fields["device"] = device_id
        if device_id > MAX_SQLITE_INT:
            raise NotFound(
                f"device {device_id} not found", code="device_not_found", field="deviceId"
            )
        # Read before the write: the reply says how things stood when it was
        # queued, and the delivery path re-checks presence after the commit.
        offline = service.is_offline(device_id)
        now = app.clock.now()
        command_id = new_command_id()
        superseded: list[str] = []

        def store(db: sqlite_utils.Database) -> dict[str, Any]:
            device = devices.get_device(db, device_id, principal.org_id)
            permissions.check_owner(principal, device)
            if device.state != "active":
                raise Conflict(
                    f"device {device_id} is not activated",
                    code="device_not_active",
                    field="deviceId",
                )
            superseded[:] = queue_command(
                db,
                command_id=command_id,
                device_id=device_id,
                command=RECONFIGURE,
                issued_at=now,
                expires_at=now + service.ttl_seconds(),
                key_id=principal.key_id,
            )
            return {"deviceIsOffline": offline, "commandId": command_id}

        reply = await request.write(store)
        request.log_fields["command_id"] = command_id
        app.spawn(
            service.queued(device_id, RECONFIGURE, command_id, list(superseded)),
            name="commands-queued",
        )
        return reply

    router.register(
        Operation(
            "provision/reconfigure", reconfigure, body=ReconfigureBody, scope="provision:write"
        )
    )
    app.route("devices/+/commands/ack", service.on_ack, qos=1)
    app.on_start.append(service.start)
    app.on_stop.append(service.stop)
