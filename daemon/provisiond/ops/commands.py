"""`P/rpc/provision/reconfigure` and the device-side `commands/ack` topic (docs/protocol.md §2, §4, §6)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from provisiond import devices, permissions
from provisiond.cluster import CLUSTER
from provisiond.commands import RECONFIGURE, Commands, queue_command
from provisiond.devices import DeviceId
from provisiond.errors import Conflict
from provisiond.presence import PRESENCE
from provisiond.rpc import Body, Operation, Request, Router
from provisiond.runtime.app import App


class ReconfigureBody(Body):
    deviceId: DeviceId  # the seed's field name


def new_command_id() -> str:
    return "cmd_" + secrets.token_hex(8)


@dataclass(frozen=True)
class Queued:
    """A reconfigure command stored for delivery, and the commands it superseded."""

    command_id: str
    offline: bool
    superseded: list[str]

    def reply(self) -> dict[str, Any]:
        return {"deviceIsOffline": self.offline, "commandId": self.command_id}


class Reconfigure:
    """The reconfigure operation; delivery is the `Commands` service's job."""

    def __init__(self, app: App, service: Commands) -> None:
        self.app = app
        self.service = service

    async def reconfigure(self, request: Request, body: ReconfigureBody) -> dict[str, Any]:
        """Queue a reconfigure command for an activated device.

        It is stored first, then published at QoS 1 at once if the device is
        online on MQTT, otherwise when it next comes online, unless it expired
        (`commands.ttl_seconds`). A newer command supersedes a queued one.
        `deviceIsOffline` says how things stood when it was queued.
        """
        principal = request.principal
        assert principal is not None
        permissions.check_provision_device(principal)
        device_id = body.deviceId
        request.log_fields["device"] = device_id
        # Read before the write: the reply says how things stood when it was
        # queued, and the delivery path re-checks presence after the commit.
        offline = self.service.is_offline(device_id)
        now = self.app.clock.now()
        command_id = new_command_id()

        def store(db: sqlite_utils.Database) -> Queued:
            device = devices.get_device(db, device_id, principal.org_id)
            permissions.check_owner(principal, device)
            if device.state != "active":
                raise Conflict(
                    f"device {device_id} is not activated",
                    code="device_not_active",
                    field="deviceId",
                )
            superseded = queue_command(
                db,
                command_id=command_id,
                device_id=device_id,
                command=RECONFIGURE,
                issued_at=now,
                expires_at=now + self.service.ttl_seconds(),
                key_id=principal.key_id,
            )
            return Queued(command_id, offline, superseded)

        queued = await request.write(store)
        request.log_fields["command_id"] = command_id
        self.app.spawn(
            self.service.queued(device_id, RECONFIGURE, command_id, queued.superseded),
            name="commands-queued",
        )
        return queued.reply()


def setup(app: App, router: Router) -> None:
    """Queue and deliver reconfigure commands; requires PRESENCE and CLUSTER."""
    service = Commands(app, app.services.get(PRESENCE), app.services.get(CLUSTER))
    ops = Reconfigure(app, service)
    router.register(
        Operation(
            "provision/reconfigure", ops.reconfigure, body=ReconfigureBody, scope="provision:write"
        )
    )
    app.route("devices/+/commands/ack", service.on_ack, qos=1)
    app.on_start.append(service.start)
