"""The administrative CLI as an operator runs it: real processes, on the store under test
(a real SQLite file, or with `--store postgresql` a database of the throwaway cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from provisiond.config import load
from provisiond.store import table_names
from support import free_port, new_store_toml, open_db

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"}
    env.pop("PROVISIOND_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "provisiond", *argv, "-c", str(config)],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip


def test_keys_lifecycle(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    db = tmp_path / "state" / "p.db"
    config.write_text(new_store_toml(db))
    assert run(config, "orgs", "create", "--id", "101", "--name", "Acme").returncode == 0
    assert run(config, "users", "create", "--org", "101", "--id", "7").returncode == 0
    created = run(
        config, "keys", "create", "--org", "101", "--user", "7",
        "--scope", "provision:write", "--permission", "PROVISION_DEVICES",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk_live_") and len(secret) == 48

    # Only the hash is stored: the key appears in no row of any table, nor (on
    # SQLite) anywhere in the database's files.
    store = open_db(load(config, env={}))
    for table in table_names(store):
        everything = repr(store.execute(f"SELECT * FROM {table}").fetchall())
        assert secret not in everything and secret[8:] not in everything, table
    rows = store.execute("SELECT id, hash FROM api_keys").fetchall()
    store.conn.close()
    assert len(rows) == 1 and len(rows[0][1]) == 64
    if db.parent.exists():
        for path in db.parent.iterdir():
            assert secret.encode() not in path.read_bytes()
            assert secret[8:].encode() not in path.read_bytes()

    listed = run(config, "keys", "list")
    assert listed.returncode == 0 and rows[0][0] in listed.stdout and secret not in listed.stdout
    assert run(config, "keys", "revoke", rows[0][0]).returncode == 0
    again = run(config, "keys", "revoke", rows[0][0])
    assert again.returncode == 1 and "already revoked" in again.stderr


def test_clear_errors(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text(new_store_toml(tmp_path / "p.db"))
    bad = run(config, "keys", "create", "--org", "999")
    assert bad.returncode == 1 and "organisation 999 does not exist" in bad.stderr
    bad = run(config, "keys", "create", "--org", "1", "--scope", "root")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    bad = run(config, "users", "create", "--org", "5", "--id", "1")
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    assert "usage" in run(config, "keys", "--help").stdout
    down = tmp_path / "down.toml"
    down.write_text(
        f'[store]\nurl = "postgresql://provisiond@127.0.0.1:{free_port()}/provisiond"\n'
    )
    result = run(down, "keys", "list")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("provisiond: cannot open the store: connection failed")
    typo = tmp_path / "typo.toml"
    typo.write_text("[daemon]\ngatway_id = 'x'\n")
    result = run(typo, "keys", "list")
    assert result.returncode == 3 and "daemon.gatway_id" in result.stderr
