"""`P/rpc/daemon/stats`: counters an operator (or `provisiond status`) asks for."""

from __future__ import annotations

from typing import Any

from provisiond import __version__
from provisiond.app import App
from provisiond.rpc import EmptyBody, Operation, Request, Router


def setup(app: App, router: Router) -> None:
    async def stats(request: Request, _body: EmptyBody) -> dict[str, Any]:
        return {
            "version": __version__,
            "uptime_seconds": round(app.clock.now() - app.started_at, 1),
            "connected": app.transport.is_connected,
            "connections": app.transport.connections,
            # QoS 0 messages (heartbeats) dropped because the daemon fell behind.
            "dropped_messages": app.transport.dropped,
            "inflight": router.inflight,
            "counters": dict(sorted(app.counters.items())),
            **{name: await probe() for name, probe in app.services.get("stats_probes", {}).items()},
        }

    router.register(Operation("daemon/stats", stats, scope="daemon:read"))
