"""A fleet of simulated devices sharing one broker and one WiFi environment."""

from __future__ import annotations

import asyncio
from typing import Any

from provisiond.wifi.crypto import CAP_WIFI_UPLOAD
from provisiond_sim.device import Broker, Identity, SimDevice, provision

DEFAULT_NETWORKS = {"provisiond-lab": "correct horse battery staple"}


class Fleet:
    def __init__(
        self,
        broker: Broker,
        *,
        networks: dict[str, str] | None = None,
        ble_transport: str | None = None,
        heartbeat_interval: float | None = None,
        connect_delay: float = 0.0,
    ) -> None:
        from provisiond_sim.ble import WifiNetworks  # bumble only when BLE is used

        self.broker = broker
        self.networks = WifiNetworks(DEFAULT_NETWORKS if networks is None else networks)
        self.ble_transport = ble_transport
        self.heartbeat_interval = heartbeat_interval
        self.connect_delay = connect_delay
        self.devices: list[SimDevice] = []
        self.peripherals: dict[int, Any] = {}

    async def provision(
        self,
        count: int,
        *,
        api_key: str,
        org_id: int,
        owner_id: int,
        capabilities: int = CAP_WIFI_UPLOAD,
        ble: int = 0,
    ) -> list[SimDevice]:
        """Provision and start `count` devices; the first `ble` of them also on BLE."""
        identities = [
            await provision(
                self.broker,
                api_key=api_key,
                org_id=org_id,
                owner_id=owner_id,
                capabilities=capabilities,
            )
            for _ in range(count)
        ]
        return [await self.add(identity, ble=i < ble) for i, identity in enumerate(identities)]

    async def add(self, identity: Identity, *, ble: bool = False, mqtt: bool = True) -> SimDevice:
        device = SimDevice(self.broker, identity, heartbeat_interval=self.heartbeat_interval)
        if mqtt:
            await device.start()
        if ble:
            if self.ble_transport is None:
                raise ValueError("a BLE device needs ble_transport")
            from provisiond_sim.ble import BlePeripheral

            peripheral = BlePeripheral(
                device.reference,
                self.networks,
                on_report=device.report_wifi,
                connect_delay=self.connect_delay,
            )
            await peripheral.open(self.ble_transport)
            self.peripherals[device.device_id] = peripheral
        self.devices.append(device)
        return device

    def peripheral(self, device_id: int) -> Any:
        return self.peripherals[device_id]

    async def stop(self) -> None:
        for peripheral in self.peripherals.values():
            await peripheral.close()
        await asyncio.gather(*(d.stop() for d in self.devices), return_exceptions=True)
