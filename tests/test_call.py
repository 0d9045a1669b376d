"""`provisiond call OP [JSON]` as an operator runs it: `.venv/bin/provisiond`, a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from daemon_proc import ROOT, python_c, write_toml
from provision_support import count, org_key

from provisiond.config import Config
from provisiond.server import Server
from support import free_port, remember_secret

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

PROVISIOND = ROOT / ".venv" / "bin" / "provisiond"


async def call(*argv: str, stdin: bytes | None = None, **env: str) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    environ.update(env)
    proc = await asyncio.create_subprocess_exec(
        str(PROVISIOND), *argv, env=environ,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_exit_codes_for_200_and_404(config: Config, daemon: Server, tmp_path: Path) -> None:
    key = org_key(config)
    config_file = write_toml(config, tmp_path / "p.toml")

    code, out, err = await call("-c", str(config_file), "call", "keys/whoami", PROVISIOND_KEY=key)
    assert code == 0, err
    reply = json.loads(out)
    assert reply["status"] == 200 and reply["body"]["org_id"] == 1

    code, out, err = await call(
        "call", "device/get", '{"deviceId": 424242}', "-c", str(config_file), PROVISIOND_KEY=key
    )
    assert code == 1, err
    reply = json.loads(out)
    assert reply["status"] == 404 and reply["error"]["code"] == "device_not_found"
    assert key not in out + err


async def test_key_file_stdin_body_and_3_1_1(
    config: Config, daemon: Server, tmp_path: Path
) -> None:
    key = org_key(config)
    config_file = write_toml(config, tmp_path / "p.toml")
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    code, out, err = await call(
        "call", "provision/token", "-", "--key-file", str(key_file), "--protocol", "3.1.1",
        "-c", str(config_file), stdin=b'{"orgId": 1, "ownerId": 10}',
    )  # fmt: skip
    assert code == 0, err
    body = json.loads(out)["body"]
    remember_secret(body["token"])
    assert count(config, "devices") == 1 and key not in out + err


async def test_bad_input_is_a_clear_error(config: Config, daemon: Server, tmp_path: Path) -> None:
    key = org_key(config)
    config_file = write_toml(config, tmp_path / "p.toml")
    code, _out, err = await call("call", "keys/whoami", "-c", str(config_file))
    assert code == 2 and "needs an API key: $PROVISIOND_KEY or --key-file" in err
    code, _out, err = await call(
        "call", "device/get", "{deviceId: 1}", "-c", str(config_file), PROVISIOND_KEY=key
    )
    assert code == 2 and "not valid JSON" in err
    code, _out, err = await call(
        "call", "device/get", "[1]", "-c", str(config_file), PROVISIOND_KEY=key
    )
    assert code == 2 and "must be an object" in err
    code, _out, err = await call(
        "call", "keys/whoami", "--key-file", str(tmp_path / "nope"), "-c", str(config_file)
    )
    assert code == 2 and "cannot read --key-file" in err
    code, _out, err = await call(
        "call", "keys/whoami", "--timeout", "0", "-c", str(config_file), PROVISIOND_KEY=key
    )
    assert code == 2 and "must be positive" in err

    # No daemon on this prefix; no broker on that port.
    nobody = write_toml(config, tmp_path / "n.toml", mqtt={"topic_prefix": "nobody-here"})
    code, _out, err = await call(
        "call", "keys/whoami", "--timeout", "1", "-c", str(nobody), PROVISIOND_KEY=key
    )
    assert code == 4 and "no reply within 1s (3 attempt(s))" in err and key not in err
    closed = write_toml(config, tmp_path / "c.toml", mqtt={"port": free_port()})
    code, _out, err = await call(
        "call", "keys/whoami", "--timeout", "2", "-c", str(closed), PROVISIOND_KEY=key
    )
    assert code == 4 and "cannot connect" in err


def test_daemon_does_not_import_the_client() -> None:
    """The client is an optional extra: starting the daemon must not need it."""
    code = (
        "import sys, provisiond.cli.main, provisiond.server, provisiond.runtime.features;"
        "assert 'provisiond.client' not in sys.modules, 'client imported';"
        "assert 'provisiond.cli.call' in sys.modules"
    )
    python_c(code, ROOT / "daemon", ROOT / "plugins")
