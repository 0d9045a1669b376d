"""The BLE bridge end to end: real broker, daemon in-process, simulated devices
on a bumble LocalLink (the bridge's virtual controller and one per device)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ble_support import PASSWORD, WRONG, BleEnv, ble_fleet, bridge_settings, local_link
from structlog.testing import LogCapture

from provisiond.presence import PRESENCE
from provisiond.rpc import Router
from provisiond.runtime.app import App
from provisiond.runtime.features import FEATURES, Feature
from provisiond_ble import profile
from provisiond_sim import SimDevice
from support import Broker, RpcClient, eventually, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store


class PresenceSpy:
    """Records channel reports on their way to the real presence service."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, bool]] = []
        self._forward: Any = None

    def attach(self, presence: Any) -> None:
        self._forward = presence.set_channel
        presence.set_channel = self.set_channel

    async def set_channel(self, device_id: int, channel: str, online: bool) -> None:
        self.calls.append((device_id, channel, online))
        if self._forward is not None:
            result = self._forward(device_id, channel, online)
            if isinstance(result, Awaitable):
                await result


@dataclass
class Env(BleEnv):
    presence: PresenceSpy
    devices: list[SimDevice] = field(default_factory=list)

    async def device(self, *, capabilities: int = 0x02, ble: bool = True) -> SimDevice:
        [dev] = await self.fleet.provision(
            1, api_key=self.key, org_id=1, owner_id=1, capabilities=capabilities, ble=int(ble)
        )
        return dev


@asynccontextmanager
async def ble_env(tmp_path: Path, broker: Broker, **bridge: Any) -> AsyncIterator[Env]:
    spy = PresenceSpy()

    def install_spy(app: App, _router: Router) -> None:
        spy.attach(app.services.get(PRESENCE))

    with local_link("test") as link:
        settings = {**bridge_settings(link), **bridge}
        config = make_config(tmp_path, broker, plugins={"ble_bridge": settings})
        _, key = seed_key(config, org=1, users=(1,))
        fleet = ble_fleet(config, broker, link)
        async with (
            running(
                config, features=[*FEATURES, Feature("spy", install_spy, requires=(PRESENCE,))]
            ) as server,
            RpcClient(config) as rpc,
        ):
            env = Env(server, rpc, fleet, key, link, spy)
            try:
                yield env
            finally:
                await fleet.stop()


@pytest.fixture
async def env(tmp_path: Path, broker: Broker, logs: LogCapture) -> AsyncIterator[Env]:
    async with ble_env(tmp_path, broker) as e:
        yield e


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.05)


async def test_upload_connects_and_grant_is_single_use(env: Env, logs: LogCapture) -> None:
    dev = await env.device()
    reply = await env.upload(dev.device_id)
    assert reply["status"] == 200, reply
    body = reply["body"]
    assert body["state"] == "connected" and body["attempts"] == 1 and "reason" not in body
    grant_id = body["grant_id"]

    # The device verified, decrypted, joined, and told the daemon over MQTT too.
    await eventually(lambda: dev.wifi_reports != [])
    assert dev.wifi_reports == [{"grant_id": grant_id, "state": "connected", "reason": None}]
    assert dev.reference.state == "idle"
    await until(lambda: env.grants.is_consumed(grant_id))

    # Replaying the captured grant over GATT: the device refuses it, in plaintext.
    peripheral = env.fleet.peripheral(dev.device_id)
    [captured] = peripheral.received_grants
    message = await env.replay_over_gatt(dev.device_id, captured)
    assert message == profile.plain_status("failed", "replayed", "grant")
    assert dev.reference.state == "idle"

    # One log line for the request, without the password anywhere.
    line = next(
        e for e in logs.entries if e.get("event") == "rpc" and e.get("op") == "wifi-config/upload"
    )
    assert line["status"] == 200 and line["state"] == "connected" and line["plugin"] == "ble_bridge"
    assert not any(PASSWORD in repr(e) for e in logs.entries)


async def test_wrong_password_then_success_without_restart(env: Env) -> None:
    dev = await env.device()
    failed = await env.upload(dev.device_id, password=WRONG)
    assert failed["status"] == 200
    assert failed["body"]["state"] == "failed" and failed["body"]["reason"] == "wrong_password"
    assert failed["body"]["stage"] == "wifi"
    ok = await env.upload(dev.device_id)
    assert ok["status"] == 200 and ok["body"]["state"] == "connected", ok
    assert ok["body"]["grant_id"] != failed["body"]["grant_id"]
    await eventually(lambda: len(dev.wifi_reports) == 2)
    assert [r["state"] for r in dev.wifi_reports] == ["failed", "connected"]
    assert dev.wifi_reports[0]["reason"] == "wrong_password"


async def test_unknown_ssid_fails_with_reason(env: Env) -> None:
    dev = await env.device()
    reply = await env.rpc.call(
        "wifi-config/upload",
        {
            "device_id": dev.device_id,
            "ssid": "elsewhere",
            "password": PASSWORD,
            "security": "wpa2-psk",
        },
        key=env.key,
        timeout=20,
    )
    assert reply["body"]["state"] == "failed" and reply["body"]["reason"] == "ssid_not_found"


async def test_device_without_wifi_capability_gets_400_before_any_ble(env: Env) -> None:
    dev = await env.device(capabilities=0x01)
    peripheral = env.fleet.peripheral(dev.device_id)
    connections: list[Any] = []
    peripheral.bt.on("connection", connections.append)
    reply = await env.upload(dev.device_id)
    assert reply["status"] == 400 and reply["error"]["code"] == "device_not_wifi_capable"
    assert reply["error"]["field"] == "device_id"
    await asyncio.sleep(0.1)
    assert connections == [] and peripheral.received_grants == []


async def test_device_not_in_range_times_out(env: Env) -> None:
    dev = await env.device()
    await eventually(lambda: (dev.device_id, "ble", True) in env.presence.calls)
    await env.fleet.peripheral(dev.device_id).stop_advertising()
    # Silent for longer than presence_timeout_seconds: offline on channel ble.
    await eventually(lambda: (dev.device_id, "ble", False) in env.presence.calls, timeout=5)
    started = time.monotonic()
    reply = await env.upload(dev.device_id, timeout_seconds=1.0)
    assert time.monotonic() - started < 3
    assert reply["status"] == 504 and reply["error"]["code"] == "device_not_in_range"
    # Back in range: found again and configured.
    await env.fleet.peripheral(dev.device_id).start_advertising()
    ok = await env.upload(dev.device_id)
    assert ok["body"]["state"] == "connected"


async def test_bad_requests_never_reach_the_radio(env: Env) -> None:
    dev = await env.device()
    short = await env.upload(dev.device_id, password="short")
    assert short["status"] == 400 and short["error"]["field"] == "password"
    unknown = await env.upload(999_999)
    assert unknown["status"] == 404
    assert env.fleet.peripheral(dev.device_id).received_grants == []


async def test_retry_on_failure_takes_a_fresh_grant(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    async with ble_env(tmp_path, broker, retry_on_failure=True) as env:
        dev = await env.device()
        lost = await env.rpc.call(
            "wifi-config/upload",
            {"device_id": dev.device_id, "ssid": "elsewhere", "password": PASSWORD},
            key=env.key,
            timeout=20,
        )
        assert lost["body"]["state"] == "failed" and lost["body"]["attempts"] == 2
        grants = env.fleet.peripheral(dev.device_id).received_grants
        assert len(grants) == 2 and grants[0] != grants[1]
        # A retry cannot fix a wrong password, so none is made.
        wrong = await env.upload(dev.device_id, password=WRONG)
        assert wrong["body"]["reason"] == "wrong_password" and wrong["body"]["attempts"] == 1
