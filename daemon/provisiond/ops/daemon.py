"""`P/rpc/daemon/stats`: counters an operator (or `provisiond status`) asks for."""

from __future__ import annotations

from typing import Any

from provisiond import __version__
from provisiond.rpc import EmptyBody, Operation, Request, Router
from provisiond.runtime.app import App


class DaemonStats:
    def __init__(self, app: App, router: Router) -> None:
        self.app = app
        self.router = router

    async def stats(self, _request: Request, _body: EmptyBody) -> dict[str, Any]:
        """Version, uptime, broker connection, requests in flight, counters, presence and plugins."""
        app = self.app
        return {
            "version": __version__,
            "uptime_seconds": round(app.clock.now() - app.started_at, 1),
            "connected": app.transport.is_connected,
            "connections": app.transport.connections,
            # QoS 0 messages (heartbeats) dropped because the daemon fell behind.
            "dropped_messages": app.transport.dropped,
            "inflight": self.router.inflight,
            "counters": dict(sorted(app.counters.items())),
            **{name: await probe() for name, probe in app.stats_probes.items()},
        }


def setup(app: App, router: Router) -> None:
    router.register(Operation("daemon/stats", DaemonStats(app, router).stats, scope="daemon:read"))
