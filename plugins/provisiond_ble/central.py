"""The gateway's side of the GATT profile, on bumble: radio, scanning, one upload.

`Radio` owns the bumble Device (opened from a transport name such as
`usb:0`, `hci-socket:0`, `serial:/dev/ttyUSB0,1000000`, or `local:NAME` for
an in-memory LocalLink registered by a test or the simulator), keeps the scan
results, and serialises connection attempts (a controller initiates one LE
connection at a time). `GattSession` is one connected device: read Device
Info, write a chunked value, receive status messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bumble.controller import Controller
from bumble.core import UUID, AdvertisingData
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from provisiond_ble import profile

# In-memory links by name, for `transport = "local:NAME"` (tests, simulator, bench).
LOCAL_LINKS: dict[str, LocalLink] = {}


class BleError(Exception):
    """A BLE step failed; `reason` is a short code for the reply."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


def random_static_address() -> Address:
    raw = bytearray(os.urandom(6))
    raw[0] |= 0xC0  # the two top bits mark a random static address
    return Address(":".join(f"{b:02X}" for b in raw), Address.RANDOM_DEVICE_ADDRESS)


@dataclass
class Sighting:
    address: Address
    flags: int
    last_seen: float  # time.monotonic()
    rssi: int


class Radio:
    """One bumble Device acting as central: scanning and connecting."""

    def __init__(self, device: Device, closer: Callable[[], Any]) -> None:
        self.device = device
        self._closer = closer
        self.sightings: dict[int, Sighting] = {}
        self._waiters: dict[int, list[asyncio.Future[Sighting]]] = {}
        self._connect_lock = asyncio.Lock()
        self.on_sighting: Callable[[int, bool], None] | None = None

    @classmethod
    async def open(cls, transport: str, address: str = "") -> Radio:
        addr = (
            Address(address, Address.RANDOM_DEVICE_ADDRESS) if address else random_static_address()
        )
        if transport.startswith("local:"):
            link = LOCAL_LINKS.get(transport[len("local:") :])
            if link is None:
                raise BleError("no_transport", f"no local link named {transport!r}")
            controller = Controller("provisiond-bridge", link=link, public_address=str(addr))
            device = Device(address=addr, host=Host(controller, AsyncPipeSink(controller)))

            def close_local() -> None:
                with contextlib.suppress(KeyError):
                    link.remove_controller(controller)

            return cls(device, close_local)
        from bumble.transport import open_transport

        hci = await open_transport(transport)
        device = Device.with_hci("provisiond-bridge", addr, hci.source, hci.sink)
        return cls(device, hci.close)

    async def start(self) -> None:
        await self.device.power_on()
        self.device.on("advertisement", self._on_advertisement)
        # No duplicate filtering: every report refreshes presence.
        await self.device.start_scanning(filter_duplicates=False)

    async def close(self) -> None:
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
        with contextlib.suppress(Exception):
            await self.device.stop_scanning()
        with contextlib.suppress(Exception):
            await self.device.power_off()
        result = self._closer()
        if asyncio.iscoroutine(result):
            with contextlib.suppress(Exception):
                await result

    def _on_advertisement(self, adv: Advertisement) -> None:
        for entry in adv.data.get_all(AdvertisingData.SERVICE_DATA_128_BIT_UUID):
            uuid, data = entry
            if uuid != UUID(profile.SERVICE_UUID):
                continue
            found = profile.parse_adv_service_data(bytes(data))
            if found is None:
                continue
            new = found.device_id not in self.sightings
            sighting = Sighting(adv.address, found.flags, time.monotonic(), adv.rssi)
            self.sightings[found.device_id] = sighting
            for fut in self._waiters.pop(found.device_id, []):
                if not fut.done():
                    fut.set_result(sighting)
            if new and self.on_sighting is not None:
                self.on_sighting(found.device_id, True)

    def expire(self, max_age: float) -> list[int]:
        """Forget devices not seen for `max_age` seconds; returns their ids."""
        horizon = time.monotonic() - max_age
        gone = [d for d, s in self.sightings.items() if s.last_seen < horizon]
        for device_id in gone:
            del self.sightings[device_id]
        return gone

    async def find(self, device_id: int, max_age: float) -> Sighting:
        """A recent sighting of the device, waiting for one; the caller bounds the wait."""
        sighting = self.sightings.get(device_id)
        if sighting is not None and time.monotonic() - sighting.last_seen <= max_age:
            return sighting
        fut: asyncio.Future[Sighting] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(device_id, []).append(fut)
        try:
            return await fut
        finally:
            waiters = self._waiters.get(device_id)
            if waiters and fut in waiters:
                waiters.remove(fut)

    async def connect(self, address: Address, limit_seconds: float) -> Connection:
        async with self._connect_lock:
            try:
                return await self.device.connect(address, timeout=limit_seconds)
            except TimeoutError:
                raise BleError("device_unreachable", "connection timed out") from None
            except Exception as exc:
                raise BleError("device_unreachable", exc.__class__.__name__) from None


class GattSession:
    """One connection to a device exposing the provisiond service."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.peer = Peer(connection)
        self.mtu = profile.DEFAULT_ATT_MTU
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self._assembler = profile.StatusAssembler()
        self._chars: dict[str, Any] = {}
        self.disconnected = asyncio.Event()
        connection.on("disconnection", lambda *_a: self._on_disconnect())

    def _on_disconnect(self) -> None:
        self.disconnected.set()

    async def setup(self) -> None:
        try:
            self.mtu = await self.peer.request_mtu(profile.PREFERRED_ATT_MTU)
            await self.peer.discover_services([UUID(profile.SERVICE_UUID)])
            services = self.peer.get_services_by_uuid(UUID(profile.SERVICE_UUID))
            if not services:
                raise BleError("not_a_provisiond_device", "service not found")
            await services[0].discover_characteristics()
            for uuid in (
                profile.DEVICE_INFO_UUID,
                profile.WIFI_GRANT_UUID,
                profile.WIFI_CREDENTIAL_UUID,
                profile.WIFI_STATUS_UUID,
            ):
                found = services[0].get_characteristics_by_uuid(UUID(uuid))
                if not found:
                    raise BleError("not_a_provisiond_device", f"characteristic {uuid} missing")
                self._chars[uuid] = found[0]
            await self._chars[profile.WIFI_STATUS_UUID].subscribe(self._on_notification)
        except BleError:
            raise
        except Exception as exc:
            raise BleError("gatt_error", exc.__class__.__name__) from None

    def _on_notification(self, value: bytes) -> None:
        message = self._assembler.feed(bytes(value))
        if message is not None:
            self.messages.put_nowait(message)

    async def device_info(self) -> dict[str, Any]:
        try:
            raw = await self._chars[profile.DEVICE_INFO_UUID].read_value()
            info = json.loads(bytes(raw))
        except Exception as exc:
            raise BleError("gatt_error", f"device info: {exc.__class__.__name__}") from None
        if not isinstance(info, dict):
            raise BleError("gatt_error", "device info is not a JSON object")
        return info

    async def write_value(self, uuid: str, value: bytes) -> None:
        """Chunked write then commit; the device acts on the commit."""
        char = self._chars[uuid]
        try:
            for frame in profile.data_frames(value, self.mtu):
                await char.write_value(frame, with_response=True)
            await char.write_value(profile.commit_frame(value), with_response=True)
        except Exception as exc:
            raise BleError("gatt_error", f"write refused: {exc.__class__.__name__}") from None

    async def next_message(self) -> bytes:
        get = asyncio.ensure_future(self.messages.get())
        gone = asyncio.ensure_future(self.disconnected.wait())
        try:
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        raise BleError("device_disconnected")

    async def close(self) -> None:
        if not self.disconnected.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.connection.disconnect(), 2)
