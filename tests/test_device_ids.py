"""One rule for device ids, on every operation that takes one (docs/protocol.md)."""

from __future__ import annotations

from typing import Any

import pytest

from provisiond.config import Config
from support import RpcClient, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

# (operation, the field holding the device id, the rest of a valid body)
OPERATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("device/get", "deviceId", {}),
    ("provision/reprovision/token", "deviceId", {}),
    ("provision/reconfigure", "deviceId", {}),
    ("wifi-config/grant", "device_id", {}),
    ("device/list", "after", {}),
]
MALFORMED = [0, -1, 2**31, 2**63, 2**70]


@pytest.mark.parametrize(("op", "field", "rest"), OPERATIONS)
async def test_malformed_ids_are_400_naming_the_field(
    config: Config, rpc: RpcClient, op: str, field: str, rest: dict[str, Any]
) -> None:
    _, key = seed_key(config)
    for bad in MALFORMED:
        reply = await rpc.call(op, {field: bad, **rest}, key=key)
        assert reply["status"] == 400, (op, bad, reply)
        assert reply["error"]["code"] == "invalid_field"
        assert reply["error"]["field"] == field


@pytest.mark.parametrize(("op", "field", "rest"), [o for o in OPERATIONS if o[0] != "device/list"])
async def test_well_formed_unknown_ids_are_404(
    config: Config, rpc: RpcClient, op: str, field: str, rest: dict[str, Any]
) -> None:
    _, key = seed_key(config)
    for unknown in (424242, 2**31 - 1):
        reply = await rpc.call(op, {field: unknown, **rest}, key=key)
        assert reply["status"] == 404, (op, unknown, reply)
        assert reply["error"]["code"] == "device_not_found"


def test_the_ble_upload_takes_the_same_device_id_rule() -> None:
    from pydantic import ValidationError

    from provisiond_ble.plugin import UploadBody

    rest = {"ssid": "net", "password": "secret-password"}
    for bad in [*MALFORMED, "0", "01", "2147483648"]:
        with pytest.raises(ValidationError):
            UploadBody.model_validate({"device_id": bad, **rest})
    assert UploadBody.model_validate({"device_id": "2147483647", **rest}).device_id == 2**31 - 1
