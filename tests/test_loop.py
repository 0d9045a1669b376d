"""The message loop never waits on slow work: heartbeats flow while every RPC slot is busy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from presence_support import FakeDevice, seed_devices
from structlog.testing import LogCapture

from provisiond.presence import PRESENCE
from provisiond.rpc import EmptyBody, Operation, Request, Router
from provisiond.runtime.app import App
from provisiond.runtime.features import FEATURES, Feature
from support import Broker, RpcClient, eventually, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

SLOW_SECONDS = 3.0


def slow_feature(app: App, router: Router) -> None:
    async def slow(_request: Request, _body: EmptyBody) -> dict[str, Any]:
        await asyncio.sleep(SLOW_SECONDS)
        return {"slept": SLOW_SECONDS}

    router.register(Operation("test/slow", slow))


async def test_heartbeats_are_handled_while_all_request_slots_are_busy(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    config = make_config(tmp_path, broker, daemon={"max_concurrent_requests": 2})
    _, key = seed_key(config)
    seed_devices(config, [7])
    async with (
        running(config, features=[*FEATURES, Feature("slow", slow_feature)]) as server,
        RpcClient(config) as rpc,
        FakeDevice(config, 7) as device,
    ):
        assert server.app is not None
        presence = server.app.services.get(PRESENCE)
        slow = [await rpc.send("test/slow", {}, key=key) for _ in range(6)]
        await asyncio.sleep(0.3)  # both slots taken, four more waiting
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await device.heartbeat()
        await eventually(lambda: not presence.is_offline(7), timeout=SLOW_SECONDS)
        # Handled long before any slot could have freed up.
        assert loop.time() - sent < SLOW_SECONDS / 2
        assert not any(f.done() for f in slow)
        replies = await asyncio.wait_for(asyncio.gather(*slow), SLOW_SECONDS * 4)
        assert [r["status"] for r in replies] == [200] * 6
