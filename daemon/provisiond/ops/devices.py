"""`P/rpc/device/get` and `P/rpc/device/list`: what a caller may see of its devices.

The view carries state, owner, capabilities, firmware and times — never a
token, a token hash or key material. Presence comes from the presence
feature's `presence_of` service when it is running; this module does not
know how presence is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from provisiond import permissions
from provisiond.app import App
from provisiond.devices import device_view, list_devices
from provisiond.rpc import Body, Operation, Request, Router

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# The seed's types: deviceId and orgId are int32, ownerId int64. Strict bodies
# mean "5", 5.0 and true are refused, not coerced.
DeviceId = Annotated[int, Field(gt=0, le=INT32_MAX)]
OrgId = Annotated[int, Field(gt=0, le=INT32_MAX)]
UserId = Annotated[int, Field(gt=0, le=INT64_MAX)]

DEFAULT_PAGE = 100
MAX_PAGE = 500

PresenceOf = Callable[[int], dict[str, Any] | None]


class GetBody(Body):
    deviceId: DeviceId


class ListBody(Body):
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE
    after: DeviceId | None = None


def setup(app: App, router: Router) -> None:
    def with_presence(view: dict[str, Any]) -> dict[str, Any]:
        presence_of: PresenceOf | None = app.services.get("presence_of")
        if presence_of is not None:
            view["presence"] = presence_of(view["deviceId"])
        return view

    async def get(request: Request, body: GetBody) -> dict[str, Any]:
        principal = request.principal
        assert principal is not None
        request.log_fields["device"] = body.deviceId
        device = await app.store.call(
            lambda db: permissions.viewable_device(db, principal, body.deviceId)
        )
        return with_presence(device_view(device))

    async def list_(request: Request, body: ListBody) -> dict[str, Any]:
        principal = request.principal
        assert principal is not None
        permissions.check_device_view(principal)
        owner = permissions.owner_filter(principal)
        # One extra row tells whether there is a next page without a COUNT.
        found = await app.store.call(
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
            "devices": [with_presence(device_view(d)) for d in page],
            "next": page[-1].id if more else None,
        }

    router.register(Operation("device/get", get, body=GetBody, scope="devices:read"))
    router.register(Operation("device/list", list_, body=ListBody, scope="devices:read"))
