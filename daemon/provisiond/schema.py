"""The database schema as named migrations, one list per feature.

A feature appends its own named steps; names are recorded in
`schema_migrations`, so adding a feature never renumbers another's steps.
"""

from __future__ import annotations

from provisiond import commands, devices, presence
from provisiond.broker_accounts import store as broker_accounts_store
from provisiond.store import Migration
from provisiond.wifi import service as wifi_service

CORE: list[Migration] = [
    Migration(
        "core-1-auth",
        """
        CREATE TABLE orgs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        );
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            org_id INTEGER NOT NULL REFERENCES orgs(id),
            created_at REAL NOT NULL
        );
        CREATE INDEX users_org ON users(org_id);
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            org_id INTEGER NOT NULL REFERENCES orgs(id),
            user_id INTEGER REFERENCES users(id),
            scopes TEXT NOT NULL,
            permissions TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        """,
    ),
    Migration(
        "core-2-replays",
        """
        CREATE TABLE replays (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            reply BLOB NOT NULL
        );
        CREATE INDEX replays_created ON replays(created_at);
        """,
    ),
]


def all_migrations() -> list[Migration]:
    return [
        *CORE,
        *devices.MIGRATIONS,
        *wifi_service.MIGRATIONS,
        *presence.MIGRATIONS,
        *commands.MIGRATIONS,
        *broker_accounts_store.MIGRATIONS,
    ]
