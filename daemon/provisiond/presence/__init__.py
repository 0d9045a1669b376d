"""Device presence (docs/presence-and-commands.md; several daemons: docs/scaling.md).

- `tracker`: one daemon's view of every active device, from heartbeats, last
  wills and plugin channels; deadlines, publishing (`Presence`, `PRESENCE`).
- `shared`: the same view when a group of daemons shares the fleet.
- `table`: the `presence` table and every query of it.
- `feature`: `setup`, which picks the mode.
"""

from provisiond.presence.table import MIGRATIONS, forget_row
from provisiond.presence.tracker import PRESENCE, Presence, parse_device_id

__all__ = ["MIGRATIONS", "PRESENCE", "Presence", "forget_row", "parse_device_id"]
