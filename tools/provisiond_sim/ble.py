"""A simulated device's BLE side: a bumble GATT peripheral around ReferenceDevice.

It speaks the profile of docs/ble-gatt.md exactly as firmware should:
advertise the deviceId as service data, expose Device Info, reassemble
chunked writes, verify the grant on commit (refusals answered in plaintext),
decrypt the credentials, "connect" to WiFi against a table of known networks,
and notify every status sealed under K_down, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bumble import att, gatt
from bumble.controller import Controller
from bumble.core import UUID, AdvertisingData
from bumble.device import Connection, Device
from bumble.hci import Address
from bumble.host import Host
from bumble.transport.common import AsyncPipeSink

from provisiond.logs import get_logger
from provisiond.wifi.crypto import WifiCredentials
from provisiond.wifi.jws import GrantRejected
from provisiond_ble import profile
from provisiond_ble.central import LOCAL_LINKS, random_static_address
from provisiond_sim.reference import CredentialRejected, ReferenceDevice

log = get_logger("provisiond.sim.ble")

Report = Callable[[dict[str, Any]], Awaitable[None]]


class DeviceEngine(Protocol):
    """The device protocol engine the peripheral drives: ReferenceDevice, or
    anything with its interface (e.g. the C firmware library through
    tools/provisiond_sim/c_engine.py). Refusals raise the reference's
    GrantRejected / CredentialRejected."""

    device_id: int
    capabilities: int

    @property
    def state(self) -> str: ...

    @property
    def last_report(self) -> dict[str, str | None] | None: ...

    def device_info(self) -> dict[str, Any]: ...

    def accept_grant(self, blob: str) -> Any: ...

    def status_message(self, reason: str | None = None) -> bytes: ...

    def receive_credentials(self, message: bytes) -> WifiCredentials: ...

    def finish(self, connected: bool, reason: str | None = None) -> bytes: ...


class WifiNetworks:
    """The simulated radio environment: SSIDs in range and their passwords."""

    def __init__(self, known: dict[str, str]) -> None:
        self.known = dict(known)

    def connect(self, creds: WifiCredentials) -> str | None:
        """None when the join succeeds, else the failure reason code."""
        if creds.ssid not in self.known:
            return "ssid_not_found"
        if self.known[creds.ssid] != creds.password:
            return "wrong_password"
        return None


class BlePeripheral:
    """One simulated device reachable over BLE."""

    def __init__(
        self,
        device: ReferenceDevice | DeviceEngine,
        networks: WifiNetworks,
        *,
        on_report: Report | None = None,
        connect_delay: float = 0.0,
        advertising_interval_ms: float = 20.0,
    ) -> None:
        self.ref = device
        self.networks = networks
        self.on_report = on_report
        self.connect_delay = connect_delay
        self.advertising_interval_ms = advertising_interval_ms
        # Every grant blob committed over GATT (a test hook for replay checks).
        self.received_grants: list[str] = []
        self.bt: Device | None = None
        self._closer: Callable[[], Any] | None = None
        self._grant_rx = profile.Reassembler(profile.MAX_GRANT_BYTES)
        self._cred_rx = profile.Reassembler(profile.MAX_CREDENTIAL_BYTES)
        self._last_status = profile.plain_status("idle")
        self._tasks: set[asyncio.Task[None]] = set()
        self._status_char: gatt.Characteristic[bytes] = gatt.Characteristic(
            UUID(profile.WIFI_STATUS_UUID),
            gatt.Characteristic.Properties.READ | gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.READABLE,
            gatt.CharacteristicValue(read=lambda _conn: self._last_status),
        )

    async def open(self, transport: str, address: str = "") -> None:
        addr = (
            Address(address, Address.RANDOM_DEVICE_ADDRESS) if address else random_static_address()
        )
        if transport.startswith("local:"):
            link = LOCAL_LINKS[transport[len("local:") :]]
            controller = Controller(
                f"sim-{self.ref.device_id}", link=link, public_address=str(addr)
            )
            self.bt = Device(address=addr, host=Host(controller, AsyncPipeSink(controller)))

            def close_local() -> None:
                with contextlib.suppress(KeyError):
                    link.remove_controller(controller)

            self._closer = close_local
        else:
            from bumble.transport import open_transport

            hci = await open_transport(transport)
            self.bt = Device.with_hci(f"sim-{self.ref.device_id}", addr, hci.source, hci.sink)
            self._closer = hci.close
        self.bt.add_service(self._service())
        self.bt.on("disconnection", lambda *_a: self._reset_transfers())
        await self.bt.power_on()
        await self.start_advertising()

    async def start_advertising(self) -> None:
        assert self.bt is not None
        flags = profile.ADV_FLAG_WIFI_UPLOAD if self.ref.capabilities & 0x02 else 0
        data = AdvertisingData(
            [
                (AdvertisingData.FLAGS, bytes([0x06])),
                (
                    AdvertisingData.SERVICE_DATA_128_BIT_UUID,
                    bytes(UUID(profile.SERVICE_UUID))
                    + profile.adv_service_data(self.ref.device_id, flags),
                ),
            ]
        )
        await self.bt.start_advertising(
            advertising_data=bytes(data),
            auto_restart=True,
            advertising_interval_min=self.advertising_interval_ms,
            advertising_interval_max=self.advertising_interval_ms,
        )

    async def stop_advertising(self) -> None:
        """Go out of range (advertising off; no one can find or connect to us)."""
        if self.bt is not None:
            await self.bt.stop_advertising()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.bt is not None:
            with contextlib.suppress(Exception):
                await self.bt.stop_advertising()
            with contextlib.suppress(Exception):
                await self.bt.power_off()
        if self._closer is not None:
            result = self._closer()
            if asyncio.iscoroutine(result):
                with contextlib.suppress(Exception):
                    await result

    def _service(self) -> gatt.Service:
        chars = gatt.Characteristic.Properties
        return gatt.Service(
            UUID(profile.SERVICE_UUID),
            [
                gatt.Characteristic(
                    UUID(profile.DEVICE_INFO_UUID),
                    chars.READ,
                    gatt.Characteristic.READABLE,
                    gatt.CharacteristicValue(
                        read=lambda _conn: profile.device_info_bytes(self.ref.device_info())
                    ),
                ),
                gatt.Characteristic(
                    UUID(profile.WIFI_GRANT_UUID),
                    chars.WRITE,
                    gatt.Characteristic.WRITEABLE,
                    gatt.CharacteristicValue(write=self._on_grant_write),
                ),
                gatt.Characteristic(
                    UUID(profile.WIFI_CREDENTIAL_UUID),
                    chars.WRITE,
                    gatt.Characteristic.WRITEABLE,
                    gatt.CharacteristicValue(write=self._on_credential_write),
                ),
                self._status_char,
            ],
        )

    def _reset_transfers(self) -> None:
        self._grant_rx = profile.Reassembler(profile.MAX_GRANT_BYTES)
        self._cred_rx = profile.Reassembler(profile.MAX_CREDENTIAL_BYTES)

    @staticmethod
    def _feed(rx: profile.Reassembler, value: bytes) -> bytes | None:
        try:
            return rx.feed(bytes(value))
        except profile.FramingError as exc:
            raise att.ATT_Error(exc.att_error, message=str(exc)) from None

    async def _notify(self, connection: Connection, message: bytes) -> None:
        assert self.bt is not None
        self._last_status = message
        for fragment in profile.status_fragments(message, connection.att_mtu):
            await self.bt.notify_subscriber(connection, self._status_char, fragment)

    async def _on_grant_write(self, connection: Connection, value: bytes) -> None:
        blob = self._feed(self._grant_rx, value)
        if blob is None:
            return
        try:
            text = blob.decode("ascii")
        except UnicodeDecodeError:
            await self._notify(connection, profile.plain_status("failed", "malformed", "grant"))
            return
        self.received_grants.append(text)
        try:
            self.ref.accept_grant(text)
        except GrantRejected as exc:
            # No session key exists for a refused grant, so the refusal is plaintext.
            log.info("sim.grant_refused", device=self.ref.device_id, reason=exc.reason)
            await self._notify(connection, profile.plain_status("failed", exc.reason, "grant"))
            return
        await self._notify(connection, profile.sealed_status(self.ref.status_message()))

    async def _on_credential_write(self, connection: Connection, value: bytes) -> None:
        message = self._feed(self._cred_rx, value)
        if message is None:
            return
        try:
            creds = self.ref.receive_credentials(message)
        except CredentialRejected as exc:
            if self.ref.state == "failed":
                # The grant was spent on this message: report under the session key.
                final = self.ref.finish(False, exc.reason)
                await self._notify(connection, profile.sealed_status(final))
                await self._report()
            else:
                await self._notify(
                    connection, profile.plain_status("failed", exc.reason, "credentials")
                )
            return
        await self._notify(connection, profile.sealed_status(self.ref.status_message()))
        # Joining a network takes time on a real device; answer the write first.
        task = asyncio.get_running_loop().create_task(self._join(connection, creds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join(self, connection: Connection, creds: WifiCredentials) -> None:
        if self.connect_delay:
            await asyncio.sleep(self.connect_delay)
        reason = self.networks.connect(creds)
        final = self.ref.finish(reason is None, reason)
        try:
            await self._notify(connection, profile.sealed_status(final))
        except Exception:
            # The uploader left; the MQTT report below still tells the daemon.
            log.info("sim.status_not_delivered", device=self.ref.device_id)
        await self._report()

    async def _report(self) -> None:
        report = self.ref.last_report
        if report is not None and self.on_report is not None:
            await self.on_report(dict(report))
