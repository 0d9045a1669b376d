"""`P/rpc/device/get` and `P/rpc/device/list`: what a caller may see of its devices.

The view carries state, owner, capabilities, firmware and times — never a
token, a token hash or key material. Presence comes from the presence
feature (the service PRESENCE) when it is running; this module does not
know how presence is computed.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from provisiond import permissions
from provisiond.devices import DeviceId, device_view, list_devices
from provisiond.presence import PRESENCE
from provisiond.rpc import Body, Operation, Request, Router
from provisiond.runtime.app import App

DEFAULT_PAGE = 100
MAX_PAGE = 500


class GetBody(Body):
    deviceId: DeviceId


class ListBody(Body):
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE
    after: DeviceId | None = None


class DeviceReads:
    """The device read operations."""

    def __init__(self, app: App) -> None:
        self.app = app

    def _with_presence(self, view: dict[str, Any]) -> dict[str, Any]:
        presence = self.app.services.find(PRESENCE)
        if presence is not None:
            view["presence"] = presence.presence_of(view["deviceId"])
        return view

    async def get(self, request: Request, body: GetBody) -> dict[str, Any]:
        """One device the key may see, with its presence (`online`, `channels`, `last_seen`, `since`)."""
        principal = request.principal
        assert principal is not None
        request.log_fields["device"] = body.deviceId
        device = await self.app.store.call(
            lambda db: permissions.viewable_device(db, principal, body.deviceId)
        )
        return self._with_presence(device_view(device))

    async def list(self, request: Request, body: ListBody) -> dict[str, Any]:
        """The devices the key may see, by id, `limit` at a time; `next` is the cursor for `after`."""
        principal = request.principal
        assert principal is not None
        permissions.check_device_view(principal)
        owner = permissions.owner_filter(principal)
        # One extra row tells whether there is a next page without a COUNT.
        found = await self.app.store.call(
            lambda db: list_devices(
                db,
                org_id=principal.org_id,
                owner_id=owner,
                after=body.after or 0,
                limit=body.limit + 1,
            )
        )
        page = found[: body.limit]
        more = len(found) > body.limit
        return {
            "devices": [self._with_presence(device_view(d)) for d in page],
            "next": page[-1].id if more else None,
        }


def setup(app: App, router: Router) -> None:
    """Device reads; shows presence when PRESENCE is provided."""
    ops = DeviceReads(app)
    router.register(Operation("device/get", ops.get, body=GetBody, scope="devices:read"))
    router.register(Operation("device/list", ops.list, body=ListBody, scope="devices:read"))
