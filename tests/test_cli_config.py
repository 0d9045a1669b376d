"""`-c FILE` before or after the command, for every command, as real processes.

Each process runs with an audit hook (a `sitecustomize` on its PYTHONPATH) that
refuses and records any open, mkdir or SQLite connect under the default paths
(/etc/provisiond, /var/lib/provisiond): a command given a config file that
still reached for a default would fail here, even on a machine where the
default paths happen to exist or be writable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_proc import ROOT, write_toml

from provisiond.cli.main import build_parser
from provisiond.config import Config
from provisiond.store import transaction
from support import Broker, make_config, open_db, rows, running, seed_key

PROVISIOND = ROOT / ".venv" / "bin" / "provisiond"

GUARD = """
import os, sys

_ROOTS = ("/etc/provisiond", "/var/lib/provisiond")
_LOG = os.environ["TEST_GUARD_LOG_PROVISIOND"]


def _hook(event, args):
    if event not in ("open", "os.mkdir", "sqlite3.connect"):
        return
    if not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if path.startswith(_ROOTS):
        with open(_LOG, "a") as f:
            f.write(f"{event} {path}\\n")
        raise PermissionError(f"test guard: {event} {path}")


sys.addaudithook(_hook)
"""

# Every leaf command, with the arguments it needs. `test_every_command_is_listed`
# fails when a command is added without an entry here.
COMMANDS: dict[str, list[str]] = {
    "run": ["run"],
    "check-config": ["check-config"],
    "orgs create": ["orgs", "create", "--id", "101", "--name", "Acme"],
    "users create": ["users", "create", "--org", "1", "--id", "77"],
    "keys create": ["keys", "create", "--org", "1", "--scope", "devices:read"],
    "keys list": ["keys", "list"],
    "keys revoke": ["keys", "revoke", "{key_id}"],
    "keys rotate-signing": ["keys", "rotate-signing"],
    "keys reseal": ["keys", "reseal"],
    "devices list": ["devices", "list"],
    "devices show": ["devices", "show", "1"],
    "tokens revoke": ["tokens", "revoke", "1"],
    "db backup": ["db", "backup", "{tmp}/backup.db"],
    "db migrate": ["db", "migrate"],
    "db copy": ["db", "copy", "{store}", "sqlite:///{tmp}/copy.db"],
    "status": ["status"],
    "call": ["call", "keys/whoami"],
    "devices decommission": ["devices", "decommission", "1"],
    "broker-accounts sync": ["broker-accounts", "sync"],
    "broker-accounts init-dynsec": [
        "broker-accounts", "init-dynsec",
        str(ROOT / "config" / "mosquitto" / "dynamic-security.json"), "{tmp}/dynsec.json",
    ],
}  # fmt: skip
NEEDS_DAEMON = {"run", "status", "call", "devices decommission"}


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(prefix)
        return
    for name, child in subs[0].choices.items():
        yield from leaf_commands(child, (*prefix, name))


def test_every_command_is_listed() -> None:
    assert sorted(leaf_commands(build_parser())) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_config_option_parses_in_both_places(command: str) -> None:
    argv = [a.replace("{key_id}", "key_x").replace("{tmp}", "/tmp") for a in COMMANDS[command]]
    parser = build_parser()
    assert parser.parse_args(["-c", "a.toml", *argv]).config == "a.toml"
    assert parser.parse_args([*argv, "-c", "a.toml"]).config == "a.toml"
    assert parser.parse_args([*argv, "--config", "b.toml"]).config == "b.toml"
    assert parser.parse_args(argv).config is None


def guarded_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path]:
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir(exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "guard.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    env["PYTHONPATH"] = str(guard_dir)
    env["TEST_GUARD_LOG_PROVISIOND"] = str(log)
    env.update(extra)
    return env, log


async def run_cli(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(PROVISIOND), *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def place(position: str, config_file: Path, argv: list[str]) -> list[str]:
    return (
        ["-c", str(config_file), *argv] if position == "before" else [*argv, "-c", str(config_file)]
    )


def test_guard_catches_the_default_path(tmp_path: Path) -> None:
    """The guard works: without -c, the command reaches for the default path and is stopped."""
    env, log = guarded_env(tmp_path)
    code, _out, err = asyncio.run(run_cli(["keys", "list"], env))
    assert code == 3 and "/etc/provisiond/provisiond.toml" in err
    assert "/etc/provisiond/provisiond.toml" in log.read_text()


def _seed_store(config: Config) -> str:
    key_id, _secret = seed_key(config, users=(5,))
    db = open_db(config)
    with transaction(db):
        db.execute(
            "INSERT INTO devices (org_id, owner_id, state, created_at) VALUES (1, 5, 'pending', ?)",
            [time.time()],
        )
    db.conn.close()
    return key_id


def _one(config: Config, sql: str, *params: object) -> tuple[object, ...] | None:
    found = rows(config, sql, params)
    return found[0] if found else None


@pytest.mark.store
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("command", sorted(set(COMMANDS) - NEEDS_DAEMON))
async def test_offline_commands_use_the_given_file(
    tmp_path: Path, broker: Broker, command: str, position: str
) -> None:
    config = make_config(tmp_path, broker)
    key_id = _seed_store(config)
    config_file = write_toml(config, tmp_path / "my.toml")
    env, log = guarded_env(tmp_path)
    argv = [
        a.replace("{key_id}", key_id)
        .replace("{tmp}", str(tmp_path))
        .replace("{store}", config.store.url or f"sqlite:///{config.store.path}")
        for a in COMMANDS[command]
    ]
    code, out, err = await run_cli(place(position, config_file, argv), env)
    assert not log.exists(), log.read_text()
    if command == "broker-accounts sync":
        # The file says accounts are managed elsewhere (backend "none"): it was read.
        assert code == 1 and "managed elsewhere" in err
        return
    if command == "db backup" and config.store.url:
        # The file names a PostgreSQL store, which `db backup` (a SQLite file copy) refuses.
        assert code == 1 and "back PostgreSQL up with pg_dump" in err
        assert not (tmp_path / "backup.db").exists()
        return
    if command == "keys reseal" and not config.store.url:
        # The file names a SQLite store, whose keys are files: it was read.
        assert code == 1 and "the store is SQLite" in err
        return
    assert code == 0, err

    # The effect landed in the store the file names.
    if command == "check-config":
        assert out.strip() == f"config ok: {config_file}"
    elif command == "orgs create":
        assert _one(config, "SELECT name FROM orgs WHERE id = 101") == ("Acme",)
    elif command == "users create":
        assert _one(config, "SELECT org_id FROM users WHERE id = 77") == (1,)
    elif command == "keys create":
        assert _one(config, "SELECT COUNT(*) FROM api_keys") == (2,)
    elif command == "keys list":
        assert key_id in out
    elif command == "keys revoke":
        row = _one(config, "SELECT revoked_at FROM api_keys WHERE id = ?", key_id)
        assert row is not None and row[0] is not None
    elif command == "keys rotate-signing":
        if config.store.url:
            # PostgreSQL: the ring lives in the store the file names (test_shared_keys.py).
            assert rows(config, "SELECT COUNT(*) FROM signing_keys") == [(1,)]
        else:
            assert any((Path(config.store.path).parent / "signing_keys").iterdir())
    elif command == "keys reseal":
        # PostgreSQL: every sealed key in the store the file names is under its KEK.
        assert "resealed 0 signing key(s)" in out
    elif command in ("devices list", "devices show"):
        assert '"deviceId": 1' in out
    elif command == "tokens revoke":
        assert "device 1 revoked" in out
    elif command == "db backup":
        assert (tmp_path / "backup.db").is_file()
    elif command == "db migrate":
        count = _one(config, "SELECT COUNT(*) FROM schema_migrations")
        assert count is not None and int(str(count[0])) > 0
    elif command == "db copy":
        copied = sqlite3.connect(tmp_path / "copy.db")
        assert copied.execute("SELECT COUNT(*) FROM devices").fetchone() == (1,)
        copied.close()
    elif command == "broker-accounts init-dynsec":
        assert (tmp_path / "dynsec.json").is_file()


@pytest.mark.parametrize("position", ["before", "after"])
def test_check_config_reports_the_bad_file_it_read(tmp_path: Path, position: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nprot = 1\n")
    env, log = guarded_env(tmp_path)
    code, out, err = asyncio.run(run_cli(place(position, bad, ["check-config"]), env))
    assert code == 3 and "mqtt.prot" in err and "config ok" not in out
    assert not log.exists()
    missing = tmp_path / "missing.toml"
    code, out, err = asyncio.run(run_cli(place(position, missing, ["check-config"]), env))
    assert code == 3 and f"config file not found: {missing}" in err


@pytest.mark.store
@pytest.mark.parametrize("position", ["before", "after"])
async def test_run_connects_where_the_file_says(
    tmp_path: Path, broker: Broker, position: str
) -> None:
    config = make_config(tmp_path, broker, log={"format": "json"})
    config_file = write_toml(config, tmp_path / "my.toml")
    env, log = guarded_env(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        str(PROVISIOND), *place(position, config_file, ["run"]), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            async for raw in proc.stdout:
                lines.append(raw.decode())
                if '"daemon.ready"' in lines[-1]:
                    break
        ready = "".join(lines)
        assert f'"port": {broker.port}' in ready or f'"port":{broker.port}' in ready, ready
        assert config.mqtt.topic_prefix in ready
        # It opened (and migrated) the store the file names.
        assert rows(config, "SELECT COUNT(*) FROM schema_migrations")[0][0] > 0
        if not config.store.url:
            assert Path(config.store.path).is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, "".join(lines)
    assert not log.exists(), log.read_text()


@pytest.mark.store
async def test_status_call_and_decommission_use_the_given_file(
    tmp_path: Path, broker: Broker
) -> None:
    config = make_config(tmp_path, broker)
    _key_id, secret = seed_key(config, scopes=("daemon:read", "provision:write"))
    _seed_store(config)
    config_file = write_toml(config, tmp_path / "my.toml")
    env, log = guarded_env(tmp_path, PROVISIOND_KEY=secret)
    async with running(config):
        for command in ("status", "call", "devices decommission"):
            for position in ("before", "after"):
                code, out, err = await run_cli(place(position, config_file, COMMANDS[command]), env)
                assert code == 0, (command, position, err)
                assert secret not in out + err
    assert not log.exists(), log.read_text()


def test_check_config_names_the_file_from_the_environment(tmp_path: Path) -> None:
    good = tmp_path / "env.toml"
    good.write_text('[daemon]\ngateway_id = "gw"\n')
    env, log = guarded_env(tmp_path, PROVISIOND_CONFIG=str(good))
    code, out, err = asyncio.run(run_cli(["check-config"], env))
    assert code == 0, err
    assert out.strip() == f"config ok: {good}"
    assert not log.exists()


def test_check_config_says_when_there_is_no_file(tmp_path: Path) -> None:
    default = Path("/etc/provisiond/provisiond.toml")
    if default.exists():
        pytest.skip(f"{default} exists on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    code, out, err = asyncio.run(run_cli(["check-config"], env))
    assert code == 0, err
    assert out.strip() == f"config ok: no file at {default}; defaults and environment only"
