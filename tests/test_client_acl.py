"""The client and `provisiond call` through the shipped mosquitto config: accounts, ACL, TLS."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from daemon_proc import write_toml
from test_call import call
from test_mosquitto_acl import PASSWORDS, PREFIX, ExampleBroker, daemon_and_key, example_broker

from provisiond.client import CallTimeout, ProvisiondClient, RpcError
from support import running

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

__all__ = ["example_broker"]  # the fixture, used by name


async def test_service_account_and_device_over_tls(
    example_broker: ExampleBroker, tmp_path: Path
) -> None:
    config, key = daemon_and_key(example_broker, tmp_path)
    async with running(config):
        # A service: its default reply topic is under replies/<username>/, which the ACL allows.
        async with ProvisiondClient(
            "127.0.0.1", example_broker.local_port, key=key,
            username="backend", password=PASSWORDS["backend"],
        ) as c:  # fmt: skip
            assert c.reply_topic.startswith(f"{PREFIX}/replies/backend/")
            assert (await c.daemon_stats())["connected"] is True

        # A reply topic the account may not read: mosquitto grants the subscription
        # but delivers nothing, so the call times out saying what to check.
        async with ProvisiondClient(
            "127.0.0.1", example_broker.local_port, key=key,
            username="backend", password=PASSWORDS["backend"],
            reply_topic=f"{PREFIX}/replies/someone-else/x", timeout=1,
        ) as c:  # fmt: skip
            with pytest.raises(CallTimeout, match="may this account read the reply topic"):
                await c.daemon_stats()

        # A device over TLS, replies under its own topic, no API key.
        tls = ssl.create_default_context(cafile=str(example_broker.directory / "certs" / "ca.crt"))
        async with ProvisiondClient(
            "localhost", example_broker.tls_port, tls=tls,
            username="1", password=PASSWORDS["1"], reply_topic=f"{PREFIX}/devices/1/replies/a",
        ) as device:  # fmt: skip
            with pytest.raises(RpcError) as caught:
                await device.device_activate(token="A" * 32, capabilities=2, public_key="A" * 43)
            assert caught.value.status == 401 and caught.value.field == "token"


async def test_call_uses_the_daemons_broker_account(
    example_broker: ExampleBroker, tmp_path: Path
) -> None:
    config, key = daemon_and_key(example_broker, tmp_path)
    config_file = write_toml(config, tmp_path / "p.toml")
    async with running(config):
        code, out, err = await call(
            "call", "keys/whoami", "-c", str(config_file), PROVISIOND_KEY=key
        )
    assert code == 0, err
    assert PASSWORDS["provisiond"] not in out + err and key not in out + err
