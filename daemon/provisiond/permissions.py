"""Who may do what (docs/protocol.md §4, the provisioning seed's rules).

Organisation-level keys (no user) are governed by scopes alone; user-scoped
keys also need the seed's permissions. A device of another organisation is
always "not found", so a key can never learn it exists.
"""

from __future__ import annotations

import sqlite_utils

from provisiond.auth import Principal, user_org
from provisiond.devices import Device, get_device
from provisiond.errors import BadRequest, Forbidden

PROVISION_DEVICES = "PROVISION_DEVICES"
ORG_VIEW_USERS = "ORG_VIEW_USERS"
OWN_DEVICES_VIEW = "OWN_DEVICES_VIEW"
ORG_DEVICES_VIEW = "ORG_DEVICES_VIEW"


def _require(principal: Principal, permission: str) -> None:
    if permission not in principal.permissions:
        raise Forbidden(f"key lacks permission {permission}", code="missing_permission")


def check_provision(principal: Principal, *, org_id: int, owner_id: int) -> None:
    """`provision/token`: may this key create a device in org_id for owner_id?"""
    if org_id != principal.org_id:
        raise Forbidden(
            "orgId is not the key's organisation", code="wrong_organisation", field="orgId"
        )
    if principal.user_id is None:
        return
    _require(principal, PROVISION_DEVICES)
    if owner_id != principal.user_id:
        _require(principal, ORG_VIEW_USERS)


def check_device_view(principal: Principal) -> None:
    """Before looking a device up: a user-scoped key must be able to view some devices."""
    if principal.user_id is None:
        return
    if not ({OWN_DEVICES_VIEW, ORG_DEVICES_VIEW} & principal.permissions):
        raise Forbidden(
            "key lacks permission OWN_DEVICES_VIEW or ORG_DEVICES_VIEW", code="missing_permission"
        )


def check_provision_device(principal: Principal) -> None:
    """`provision/reconfigure` and `reprovision/token`, before the device is looked up."""
    if principal.user_id is None:
        return
    _require(principal, PROVISION_DEVICES)
    check_device_view(principal)


def check_owner(principal: Principal, device: Device) -> None:
    """After lookup (same organisation): user-scoped keys act on their own devices
    unless they hold ORG_DEVICES_VIEW."""
    if principal.user_id is None or ORG_DEVICES_VIEW in principal.permissions:
        return
    if device.owner_id != principal.user_id:
        raise Forbidden("device is not owned by the key's user", code="not_device_owner")


def can_view_all(principal: Principal) -> bool:
    return principal.user_id is None or ORG_DEVICES_VIEW in principal.permissions


def owner_filter(principal: Principal) -> int | None:
    """For listings: the only owner whose devices this key sees, or None for the whole org."""
    return None if can_view_all(principal) else principal.user_id


def check_owner_in_org(db: sqlite_utils.Database, *, org_id: int, owner_id: int) -> None:
    """`provision/token`: ownerId must be a user of orgId. Run only after `check_provision`,
    so a key that may not look at other users cannot probe which ones exist."""
    if user_org(db, owner_id) != org_id:
        raise unknown_owner(org_id=org_id, owner_id=owner_id)


def unknown_owner(*, org_id: int, owner_id: int) -> BadRequest:
    """The refusal of `check_owner_in_org`, for a check folded into a write
    (`devices.create_device(..., owner_check=...)`)."""
    return BadRequest(
        f"ownerId {owner_id} is not a user of organisation {org_id}",
        code="unknown_user",
        field="ownerId",
    )


def provisionable_device(db: sqlite_utils.Database, principal: Principal, device_id: int) -> Device:
    """The whole §5 rule for `provision/reprovision/token` and `provision/reconfigure`:
    403 for a missing permission (checked before the lookup, so it reveals nothing),
    404 outside the key's organisation, 403 for another user's device without
    ORG_DEVICES_VIEW."""
    check_provision_device(principal)
    device = get_device(db, device_id, principal.org_id)
    check_owner(principal, device)
    return device


def viewable_device(db: sqlite_utils.Database, principal: Principal, device_id: int) -> Device:
    """`device/get` and other reads: the same shape as `provisionable_device`
    without PROVISION_DEVICES."""
    check_device_view(principal)
    device = get_device(db, device_id, principal.org_id)
    check_owner(principal, device)
    return device


def positive_id(value: int, field: str) -> int:
    if value <= 0:
        raise BadRequest(f"{field} must be a positive integer", field=field)
    return value
