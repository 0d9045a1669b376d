"""`provisiond broker-accounts sync`: make the broker's device accounts match the store.

Drift comes from crashes between the broker step and the store commit, from
accounts deleted by hand, from a store restored from backup, or from turning
the backend on for a fleet provisioned without it. The plan:

- an account or role named `<username_prefix>N` whose device N does not exist,
  is decommissioned, or holds only a stale reservation: deleted;
- a pending or active device without its account or role: made (the account
  with no password — nobody knows one; a re-provision issues it), with the
  role its state calls for.

Accounts of ids reserved by a provisioning request in flight are left alone.
Names without the prefix, or with a non-numeric rest, are not the daemon's and
are never touched. Roles that exist are not compared ACL by ACL (that would
cost one `getRole` per device); `provision/reprovision/token` rewrites a
device's role from scratch.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from provisiond.broker_accounts import BrokerAccounts, Repair, SyncPlan
from provisiond.broker_accounts import store as account_store
from provisiond.logs import get_logger

log = get_logger("provisiond.broker_accounts")

LIVE_STATES = ("pending", "active")
# Names listed in a log line or CLI summary; the counts are always complete.
SHOWN = 20

StoreCall = Callable[[Callable[[sqlite_utils.Database], Any]], Awaitable[Any]]


@dataclass(frozen=True)
class SyncResult:
    plan: SyncPlan
    applied: bool
    stale_reservations: frozenset[int]

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "applied": self.applied,
            "delete_clients": len(plan.delete_clients),
            "delete_roles": len(plan.delete_roles),
            "create": len(plan.repairs),
            "deleted_names": plan.delete_clients[:SHOWN],
            "created_devices": [r.device_id for r in plan.repairs[:SHOWN]],
        }


def make_plan(
    prefix: str,
    states: dict[int, str],
    in_flight: set[int],
    clients: frozenset[str],
    roles: frozenset[str],
) -> SyncPlan:
    pattern = re.compile(re.escape(prefix) + r"([1-9][0-9]{0,18})")

    def ours(names: frozenset[str]) -> dict[int, str]:
        found: dict[int, str] = {}
        for name in names:
            match = pattern.fullmatch(name)
            if match:
                found[int(match.group(1))] = name
        return found

    our_clients, our_roles = ours(clients), ours(roles)
    live = {i for i, state in states.items() if state in LIVE_STATES}
    keep = live | in_flight
    delete_clients = sorted((name for i, name in our_clients.items() if i not in keep), key=len)
    delete_roles = sorted((name for i, name in our_roles.items() if i not in keep), key=len)
    repairs = [
        Repair(
            device_id=i,
            active=states[i] == "active",
            create_role=i not in our_roles,
            create_client=i not in our_clients,
        )
        for i in sorted(live)
        if i not in our_roles or i not in our_clients
    ]
    return SyncPlan(sorted(delete_clients), sorted(delete_roles), repairs)


async def sync(
    accounts: BrokerAccounts, store_call: StoreCall, *, prefix: str, now: float, apply: bool
) -> SyncResult:
    """Compare (and with `apply`, fix). `store_call` runs a function on the store
    (the daemon's `Store.call`, or a direct call in the CLI)."""
    # The broker first: every account it lists was made after its id was
    # reserved, so the store read next knows that id (reserved or committed),
    # and an account being made right now is never taken for a stray one.
    listed = await accounts.list_accounts()
    states, in_flight, stale = await store_call(lambda db: account_store.snapshot(db, now=now))
    plan = make_plan(prefix, states, in_flight, listed.clients, listed.roles)
    if apply:
        if not plan.empty:
            await accounts.apply(plan)
        if stale:
            # Their accounts are deleted above (stale ids are not kept); the
            # reservation rows go only once that has succeeded.
            await store_call(lambda db: account_store.drop_reservations(db, stale))
    result = SyncResult(plan, apply, frozenset(stale))
    if apply and not plan.empty:
        log.info("broker_accounts.synced", **result.summary())
    elif not plan.empty:
        log.info("broker_accounts.drift", **result.summary())
    return result
