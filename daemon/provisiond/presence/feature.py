"""The presence feature: this daemon's own, or shared by a group of daemons."""

from __future__ import annotations

from typing import TYPE_CHECKING

from provisiond.cluster import CLUSTER
from provisiond.presence.shared import SharedPresence
from provisiond.presence.tracker import PRESENCE, Presence
from provisiond.runtime.app import App

if TYPE_CHECKING:
    from provisiond.rpc import Router


def setup(app: App, _router: Router) -> None:
    """Track presence from heartbeats and status messages; provides PRESENCE.

    Shared with the other daemons of `[mqtt] shared_group` when one is set
    (requires CLUSTER); this daemon's own otherwise.
    """
    cluster = app.services.get(CLUSTER)
    presence = SharedPresence(app, cluster) if cluster.shared else Presence(app)
    app.services.provide(PRESENCE, presence)
    app.stats_probes["presence"] = presence.stats
    app.route("devices/+/heartbeat", presence.on_heartbeat, qos=0)
    # QoS 1: a last will must not be lost while the daemon reconnects.
    app.route("devices/+/status", presence.on_status, qos=1)
    app.on_start.append(presence.start)
    app.on_stop.append(presence.stop)
    app.on_reload.append(presence.reload)
