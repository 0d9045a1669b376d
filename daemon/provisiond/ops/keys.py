"""`P/rpc/keys/whoami`: who the presented key is — proves the whole RPC path."""

from __future__ import annotations

from typing import Any

from provisiond.rpc import EmptyBody, Operation, Request, Router
from provisiond.runtime.app import App


async def whoami(request: Request, _body: EmptyBody) -> dict[str, Any]:
    """The key's id, organisation, user, scopes and permissions (never the key)."""
    assert request.principal is not None
    return request.principal.as_dict()


def setup(_app: App, router: Router) -> None:
    router.register(Operation("keys/whoami", whoami))
