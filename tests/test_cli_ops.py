"""Operator commands as an operator runs them: `status`, `db backup`, `keys rotate-signing`."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import time
from pathlib import Path

import jwt
import pytest
from daemon_proc import ROOT, NotifySocket, daemon_process, provisiond, python_c, write_toml
from provision_support import activate, org_key, provision

from provisiond.config import Config
from provisiond.server import Server
from provisiond.wifi.signing import KeyRing
from support import (
    RpcClient,
    file_keys_only,
    free_port,
    new_store_toml,
    seed_key,
    sqlite_only,
)

# --- status


async def test_status_asks_the_running_daemon(
    config: Config, daemon: Server, tmp_path: Path
) -> None:
    _key_id, secret = seed_key(config, scopes=("daemon:read",))
    config_file = write_toml(config, tmp_path / "p.toml")
    code, out, err = await provisiond("status", "-c", str(config_file), PROVISIOND_KEY=secret)
    assert code == 0, err
    assert "up 0m" in out and "broker connected" in out
    assert "requests: " in out
    assert "devices: 0 online, 0 offline" in out
    assert secret not in out + err

    code, out, err = await provisiond("status", "--json", "--key", secret, "-c", str(config_file))
    assert code == 0, err
    stats = json.loads(out)
    assert stats["connected"] is True and stats["counters"]["rpc.status.200"] >= 1


async def test_status_failures_are_one_clear_line(
    config: Config, daemon: Server, tmp_path: Path
) -> None:
    _key_id, secret = seed_key(config, scopes=("devices:read",))
    config_file = write_toml(config, tmp_path / "p.toml")

    code, _out, err = await provisiond("status", "-c", str(config_file))
    assert code == 1 and "needs an API key with scope daemon:read" in err

    code, _out, err = await provisiond("status", "-c", str(config_file), PROVISIOND_KEY=secret)
    assert code == 1 and "403 missing_scope" in err

    # A prefix nobody serves: no daemon answers.
    nobody = write_toml(config, tmp_path / "n.toml", mqtt={"topic_prefix": "nobody-here"})
    started = time.monotonic()
    code, _out, err = await provisiond(
        "status", "--timeout", "1", "-c", str(nobody), PROVISIOND_KEY=secret
    )
    assert code == 1 and "no reply from the daemon within 1s" in err
    assert time.monotonic() - started < 15

    closed = write_toml(config, tmp_path / "c.toml", mqtt={"port": free_port()})
    code, _out, err = await provisiond("status", "-c", str(closed), PROVISIOND_KEY=secret)
    assert code == 1 and "cannot talk to the broker at 127.0.0.1:" in err
    assert "Traceback" not in err


def test_status_needs_neither_aiomqtt_nor_paho() -> None:
    """The core CLI talks to the broker through the daemon's own client."""
    code = (
        "import sys, provisiond.cli.main, provisiond.cli.ops, provisiond.transport, "
        "provisiond.backends.native; "
        "print(sorted(m for m in sys.modules if m.startswith(('aiomqtt', 'paho'))))"
    )
    assert python_c(code, ROOT / "daemon").strip() == "[]"


# --- db backup


@sqlite_only("db backup copies a SQLite file; PostgreSQL is backed up with pg_dump")
async def test_db_backup_while_the_daemon_runs(
    config: Config, daemon: Server, tmp_path: Path
) -> None:
    key_id, _secret = seed_key(config)
    config_file = write_toml(config, tmp_path / "p.toml")
    target = tmp_path / "backup.db"

    code, out, err = await provisiond("db", "backup", str(target), "-c", str(config_file))
    assert code == 0, err
    assert "integrity ok" in out
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    copy = sqlite3.connect(target)
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert copy.execute("SELECT id FROM api_keys").fetchall() == [(key_id,)]
    copy.close()
    assert not list(tmp_path.glob(".backup.db.partial"))

    code, _out, err = await provisiond("db", "backup", str(target), "-c", str(config_file))
    assert code == 1 and "exists; pass --force" in err
    code, _out, err = await provisiond(
        "db", "backup", str(target), "--force", "-c", str(config_file)
    )
    assert code == 0, err


@sqlite_only("db backup copies a SQLite file; on PostgreSQL it refuses (test_cli_config.py)")
async def test_db_backup_never_creates_a_missing_database(tmp_path: Path) -> None:
    config_file = tmp_path / "p.toml"
    config_file.write_text(f'[store]\npath = "{tmp_path / "missing.db"}"\n')
    code, _out, err = await provisiond(
        "db", "backup", str(tmp_path / "b.db"), "-c", str(config_file)
    )
    assert code == 1 and "no database at" in err
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "b.db").exists()


# --- keys rotate-signing


@sqlite_only(
    "the ring in keys_dir files; on PostgreSQL it lives in the store (test_shared_keys.py)"
)
async def test_rotate_signing_makes_a_new_active_key(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    config_file = tmp_path / "p.toml"
    config_file.write_text(
        f'[store]\npath = "{tmp_path / "p.db"}"\n[wifi]\nkeys_dir = "{keys_dir}"\n'
    )
    # The daemon made its ring at some earlier start.
    first = KeyRing.load_or_create(keys_dir, "EdDSA", now=time.time()).active.kid

    code, out, err = await provisiond("keys", "rotate-signing", "-c", str(config_file))
    assert code == 0, err
    ring = KeyRing.load_or_create(keys_dir, "EdDSA", now=time.time())
    assert ring.active.kid != first
    assert f"new signing key {ring.active.kid} is active" in out
    old = ring.get(first)
    assert old is not None and old.verify_until is not None
    assert 3500 < old.verify_until - time.time() <= 3600
    assert f"key {first} now only verifies" in out
    assert "systemctl reload provisiond" in out
    for pem in keys_dir.glob("*.pem"):
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600


@pytest.mark.store
async def test_rotate_signing_refuses_keys_it_does_not_manage(tmp_path: Path) -> None:
    config_file = tmp_path / "p.toml"
    store = new_store_toml(tmp_path / "p.db")
    config_file.write_text(
        store + '[wifi]\nsigning_algorithm = "HS256"\nhs256_master_secret_file = "m"\n'
    )
    code, _out, err = await provisiond("keys", "rotate-signing", "-c", str(config_file))
    assert code == 1 and "HS256" in err
    config_file.write_text(store + '[wifi]\nsigning_key_files = ["a.pem"]\n')
    code, _out, err = await provisiond("keys", "rotate-signing", "-c", str(config_file))
    assert code == 1 and "operator-managed" in err


@file_keys_only()
async def test_sighup_after_rotate_signing_signs_grants_with_the_new_key(
    config: Config, tmp_path: Path
) -> None:
    """The operator's sequence: rotate on disk, `systemctl reload` (SIGHUP), no restart."""
    keys_dir = tmp_path / "keys"
    config_file = write_toml(
        config,
        tmp_path / "provisiond.toml",
        log={"format": "json"},
        wifi={"keys_dir": str(keys_dir)},
    )
    key = org_key(config)
    notify = NotifySocket()
    notify.start()
    async with RpcClient(config) as rpc, daemon_process(config_file, notify) as daemon:
        await notify.wait_for("READY=1")
        token, device_id = await provision(rpc, key)
        assert (await activate(rpc, token))["status"] == 200
        first = (await rpc.call("wifi-config/keys", key=key))["body"]["keys"][0]["kid"]

        code, out, err = await provisiond("keys", "rotate-signing", "-c", str(config_file))
        assert code == 0, err
        # Before the reload the running daemon still signs with the old key.
        grant = await rpc.call("wifi-config/grant", {"device_id": device_id}, key=key)
        assert jwt.get_unverified_header(grant["body"]["grant_blob"])["kid"] == first

        mark = len(notify.lines())
        daemon.signal(signal.SIGHUP)
        await notify.wait_for("READY=1", after=mark)
        loaded = await daemon.wait_event("wifi.keys_loaded", count=2)
        new = loaded["kid"]
        assert new != first and loaded["previous_kid"] == first
        assert f"new signing key {new} is active" in out

        keys = (await rpc.call("wifi-config/keys", key=key))["body"]["keys"]
        assert [k["kid"] for k in keys] == [new, first]  # the old one still verifies
        grant = await rpc.call("wifi-config/grant", {"device_id": device_id}, key=key)
        assert jwt.get_unverified_header(grant["body"]["grant_blob"])["kid"] == new

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0, daemon.tail()
    notify.close()
