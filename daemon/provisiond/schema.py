"""The database schema: each owning module's named migrations, in order.

Each module that owns tables keeps their migrations beside its queries;
names are recorded in `schema_migrations`, so adding a step to one owner
never renumbers another's.
"""

from __future__ import annotations

from provisiond import auth, commands, devices, presence, replay, tokens
from provisiond.broker_accounts import certificates
from provisiond.broker_accounts import store as broker_accounts_store
from provisiond.store import Migration
from provisiond.wifi import keystore as wifi_keystore
from provisiond.wifi import service as wifi_service


def all_migrations() -> list[Migration]:
    return [
        *auth.MIGRATIONS,
        *replay.MIGRATIONS,
        *devices.MIGRATIONS,
        *tokens.MIGRATIONS,
        *wifi_service.MIGRATIONS,
        *presence.MIGRATIONS,
        *commands.MIGRATIONS,
        *broker_accounts_store.MIGRATIONS,
        *wifi_keystore.MIGRATIONS,
        *certificates.MIGRATIONS,
    ]
