"""`provisiond devices list|show` and `provisiond tokens revoke` as an operator runs them,
against the store of a running daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_proc import provisiond
from provision_support import activate, org_key, provision, token_rows

from provisiond.config import Config
from support import RpcClient, store_toml

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store


async def cli(config_file: Path, *argv: str) -> tuple[int, str, str]:
    result: tuple[int, str, str] = await provisiond(*argv, "-c", str(config_file))
    return result


async def test_devices_list_show_and_tokens_revoke(
    tmp_path: Path, config: Config, rpc: RpcClient
) -> None:
    config_file = tmp_path / "provisiond.toml"
    config_file.write_text(store_toml(config))
    key = org_key(config, users=(10, 11))
    other_org = org_key(config, org=2, users=(20,))
    used, active_id = await provision(rpc, key, owner=10)
    assert (await activate(rpc, used, capabilities=2, firmware_version="9.9"))["status"] == 200
    pending, pending_id = await provision(rpc, key, owner=11)
    foreign, foreign_id = await provision(rpc, other_org, org=2, owner=20)

    code, out, err = await cli(config_file, "devices", "list")
    assert code == 0, err
    listed = json.loads(out)
    assert [d["deviceId"] for d in listed] == [active_id, pending_id, foreign_id]
    assert [d["state"] for d in listed] == ["active", "pending", "pending"]
    code, out, _ = await cli(config_file, "devices", "list", "--org", "1", "--state", "pending")
    assert code == 0 and [d["deviceId"] for d in json.loads(out)] == [pending_id]
    code, out, _ = await cli(config_file, "devices", "list", "--owner", "20")
    assert code == 0 and [d["deviceId"] for d in json.loads(out)] == [foreign_id]

    code, out, err = await cli(config_file, "devices", "show", str(active_id))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["deviceId"] == active_id and shown["firmware_version"] == "9.9"
    assert shown["has_public_key"] is True
    assert [t["state"] for t in shown["tokens"]] == ["used"]
    code, _, err = await cli(config_file, "devices", "show", "424242")
    assert code == 1 and "no device with id 424242" in err

    code, out, err = await cli(config_file, "tokens", "revoke", str(pending_id))
    assert code == 0, err
    assert "1 unused token(s)" in out
    assert token_rows(config, pending_id)[0][2] is not None
    # The daemon sees the revocation at once.
    reply = await activate(rpc, pending)
    assert reply["status"] == 410 and reply["error"]["code"] == "token_revoked"
    code, out, _ = await cli(config_file, "tokens", "revoke", str(pending_id))
    assert code == 0 and "0 unused token(s)" in out
    code, out, _ = await cli(config_file, "devices", "show", str(pending_id))
    assert [t["state"] for t in json.loads(out)["tokens"]] == ["revoked"]
    code, _, err = await cli(config_file, "tokens", "revoke", "424242")
    assert code == 1 and "no device" in err
    code, _, err = await cli(config_file, "tokens", "revoke", "-3")
    assert code == 2

    # No command prints a token or its hash.
    code, everything, _ = await cli(config_file, "devices", "list")
    for _, device_id in ((used, active_id), (pending, pending_id), (foreign, foreign_id)):
        _, shown_out, _ = await cli(config_file, "devices", "show", str(device_id))
        everything += shown_out
    for token in (used, pending, foreign):
        assert token not in everything
    for token_hash, *_rest in token_rows(config, active_id) + token_rows(config, pending_id):
        assert token_hash not in everything
