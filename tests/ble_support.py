"""What the BLE end-to-end tests share: the network they upload, a daemon with
the bridge on a bumble LocalLink, and a fleet of simulated devices on that link."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bumble.link import LocalLink

from provisiond.config import Config
from provisiond.server import Server
from provisiond.wifi.service import GRANTS
from provisiond_ble import profile
from provisiond_ble.central import LOCAL_LINKS, GattSession, Radio
from provisiond_sim.device import Broker as SimBroker
from provisiond_sim.fleet import Fleet
from support import Broker, RpcClient, remember_secret

SSID = "provisiond-lab"
PASSWORD = remember_secret("correct horse battery staple")
WRONG = remember_secret("not the right password")


@contextmanager
def local_link(prefix: str) -> Iterator[str]:
    """A fresh virtual radio link, named for the bridge's `local:NAME` transport."""
    link = f"{prefix}-{uuid.uuid4().hex[:8]}"
    LOCAL_LINKS[link] = LocalLink()
    try:
        yield link
    finally:
        LOCAL_LINKS.pop(link, None)


def bridge_settings(link: str) -> dict[str, Any]:
    return {
        "transport": f"local:{link}",
        "presence_timeout_seconds": 1.0,
        "default_timeout_seconds": 10.0,
    }


def ble_fleet(config: Config, broker: Broker, link: str) -> Fleet:
    sim_broker = SimBroker("127.0.0.1", broker.port, config.mqtt.topic_prefix)
    return Fleet(sim_broker, ble_transport=f"local:{link}")


@dataclass
class BleEnv:
    server: Server
    rpc: RpcClient
    fleet: Fleet
    key: str
    link: str

    async def upload(
        self, device_id: int, password: str = PASSWORD, **extra: Any
    ) -> dict[str, Any]:
        body = {"device_id": device_id, "ssid": SSID, "password": password, **extra}
        return await self.rpc.call("wifi-config/upload", body, key=self.key, timeout=20)

    @property
    def grants(self) -> Any:
        assert self.server.app is not None
        return self.server.app.services.get(GRANTS)

    async def replay_over_gatt(self, device_id: int, grant: str) -> bytes:
        """An attacker in radio range writes `grant` to the device: its answer."""
        attacker = await Radio.open(f"local:{self.link}")
        await attacker.start()
        try:
            sighting = await asyncio.wait_for(attacker.find(device_id, 5), 5)
            session = GattSession(await attacker.connect(sighting.address, 5))
            await session.setup()
            await session.write_value(profile.WIFI_GRANT_UUID, grant.encode())
            message = await asyncio.wait_for(session.next_message(), 5)
            await session.close()
            return message
        finally:
            await attacker.close()
