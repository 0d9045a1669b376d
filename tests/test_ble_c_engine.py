"""The BLE bridge uploading to a simulated device whose protocol engine is the
C firmware library (ctypes): real mosquitto, the daemon in-process signing
ES256 grants, bumble's LocalLink between the bridge and the device."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ble_support import PASSWORD, SSID, WRONG, BleEnv, ble_fleet, bridge_settings, local_link
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from firmware_support import shared_library
from structlog.testing import LogCapture

from provisiond.wifi.crypto import b64url_encode
from provisiond.wifi.jws import GrantRejected
from provisiond.wifi.uploader import Uploader
from provisiond_ble import profile
from provisiond_sim.ble import BlePeripheral
from provisiond_sim.c_engine import CEngine, FirmwareLibrary, load_library
from provisiond_sim.device import SimDevice, provision
from provisiond_sim.reference import ReferenceDevice
from support import Broker, RpcClient, eventually, make_config, running, seed_key

VECTORS = Path(__file__).parent / "vectors" / "wifi-grant-v1.json"


@pytest.fixture(scope="module")
def firmware() -> FirmwareLibrary:
    return load_library(shared_library())


@dataclass
class CDevice:
    sim: SimDevice
    engine: CEngine
    peripheral: BlePeripheral


@dataclass
class Env(BleEnv):
    firmware: FirmwareLibrary

    async def c_device(self) -> CDevice:
        """Provision and activate over MQTT, then go on air with the C engine."""
        identity = await provision(self.fleet.broker, api_key=self.key, org_id=1, owner_id=1)
        # The activation reply pins the daemon's ES256 key, which the library can verify.
        assert [k["alg"] for k in identity.pinned_keys] == ["ES256"]
        sim = SimDevice(self.fleet.broker, identity)
        await sim.start()
        engine = CEngine(
            identity.device_id,
            identity.private_key,
            identity.pinned_keys,
            library=self.firmware,
        )
        peripheral = BlePeripheral(engine, self.fleet.networks, on_report=sim.report_wifi)
        await peripheral.open(f"local:{self.link}")
        # The fleet stops them with the others.
        self.fleet.devices.append(sim)
        self.fleet.peripherals[identity.device_id] = peripheral
        return CDevice(sim, engine, peripheral)


@asynccontextmanager
async def c_env(tmp_path: Path, broker: Broker, firmware: FirmwareLibrary) -> AsyncIterator[Env]:
    with local_link("c") as link:
        config = make_config(
            tmp_path,
            broker,
            wifi={"signing_algorithm": "ES256"},
            plugins={"ble_bridge": bridge_settings(link)},
        )
        _, key = seed_key(config, org=1, users=(1,))
        fleet = ble_fleet(config, broker, link)
        async with running(config) as server, RpcClient(config) as rpc:
            try:
                yield Env(server, rpc, fleet, key, link, firmware)
            finally:
                await fleet.stop()


@pytest.mark.store
async def test_c_engine_connected(
    tmp_path: Path, broker: Broker, firmware: FirmwareLibrary, logs: LogCapture
) -> None:
    async with c_env(tmp_path, broker, firmware) as env:
        dev = await env.c_device()
        nonce_before = dev.engine.nonce
        reply = await env.upload(dev.sim.device_id)
        assert reply["status"] == 200, reply
        body = reply["body"]
        assert body["state"] == "connected" and body["attempts"] == 1, body
        grant_id = body["grant_id"]

        # The C engine decided, and its report reached the daemon over MQTT.
        await eventually(lambda: dev.sim.wifi_reports != [])
        assert dev.sim.wifi_reports == [
            {"grant_id": grant_id, "state": "connected", "reason": None}
        ]
        assert dev.engine.last_report == dev.sim.wifi_reports[0]
        assert dev.engine.state == "idle"
        for _ in range(100):
            if await env.grants.is_consumed(grant_id):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the daemon never recorded the grant as consumed")
        # The grant was bound to the nonce the C device showed, and made durable
        # through the persist callback before the credentials were taken.
        [blob] = dev.peripheral.received_grants
        claims = json.loads(_b64(blob.split(".")[1]))
        assert _b64(claims["dn"]) == nonce_before and dev.engine.nonce != nonce_before
        assert claims["jti"] == grant_id and len(dev.engine.persisted) == 1
        # Only the ES256 path was used: the header says so.
        assert json.loads(_b64(blob.split(".")[0]))["alg"] == "ES256"
    assert not any(PASSWORD in repr(e) for e in logs.entries)


@pytest.mark.store
async def test_c_engine_wrong_password_then_success(
    tmp_path: Path, broker: Broker, firmware: FirmwareLibrary
) -> None:
    async with c_env(tmp_path, broker, firmware) as env:
        dev = await env.c_device()
        failed = await env.upload(dev.sim.device_id, password=WRONG)
        assert failed["status"] == 200, failed
        assert failed["body"]["state"] == "failed"
        assert failed["body"]["reason"] == "wrong_password"
        assert failed["body"]["stage"] == "wifi"
        # No reset needed: a fresh grant works at once.
        ok = await env.upload(dev.sim.device_id)
        assert ok["status"] == 200 and ok["body"]["state"] == "connected", ok
        assert ok["body"]["grant_id"] != failed["body"]["grant_id"]
        await eventually(lambda: len(dev.sim.wifi_reports) == 2)
        assert [r["state"] for r in dev.sim.wifi_reports] == ["failed", "connected"]
        assert dev.sim.wifi_reports[0]["reason"] == "wrong_password"
        assert len(dev.engine.persisted) == 2


@pytest.mark.store
async def test_c_engine_replayed_grant(
    tmp_path: Path, broker: Broker, firmware: FirmwareLibrary
) -> None:
    async with c_env(tmp_path, broker, firmware) as env:
        dev = await env.c_device()
        ok = await env.upload(dev.sim.device_id)
        assert ok["body"]["state"] == "connected", ok
        [captured] = dev.peripheral.received_grants

        # An attacker in radio range replays the captured grant over GATT.
        message = await env.replay_over_gatt(dev.sim.device_id, captured)
        assert message == profile.plain_status("failed", "replayed", "grant")
        assert dev.engine.state == "idle" and len(dev.engine.persisted) == 1

        # After a reboot from what was persisted, still refused.
        rebooted = CEngine(
            dev.sim.device_id,
            dev.sim.identity.private_key,
            dev.sim.identity.pinned_keys,
            library=firmware,
            freshness=dev.engine.persisted[-1],
        )
        with pytest.raises(GrantRejected) as refused:
            rebooted.accept_grant(captured)
        assert refused.value.reason == "replayed"


def test_c_engine_agrees_with_the_reference_device(firmware: FirmwareLibrary) -> None:
    """Same inputs, same verdicts and bytes: the ES256 vectors through both engines."""
    vec = json.loads(VECTORS.read_text())
    priv = X25519PrivateKey.from_private_bytes(bytes.fromhex(vec["keys"]["device_x25519_private"]))
    ctx = vec["es256"]["rejects"]["device_context"]
    nonce = bytes.fromhex(ctx["nonce"])

    def both() -> tuple[CEngine, ReferenceDevice]:
        kwargs: dict[str, Any] = {"now": lambda: ctx["now"], "nonce": nonce}
        return (
            CEngine(42, priv, ctx["pinned"], library=firmware, **kwargs),
            ReferenceDevice(42, priv, ctx["pinned"], **kwargs),
        )

    for case in vec["es256"]["rejects"]["cases"]:
        c, ref = both()
        reasons = []
        for engine in (c, ref):
            with pytest.raises(GrantRejected) as info:
                engine.accept_grant(case["blob"])
            reasons.append(info.value.reason)
        assert reasons == [case["reason"]] * 2, case["name"]

    # Edges the vectors do not name: both engines give the same reason.
    head, body, sig = vec["es256"]["blob"].split(".")
    odd = [
        f"{head}.{body}.{b64url_encode(os.urandom(100))}",  # oversized signature
        f"{head}.{body}.{sig}.{sig}",  # four segments
        f"{head}.{body}",  # two
        f"{head}.{body}.{sig}=",  # padding
        f"{head}.{body[:-2]}.{sig}",  # payload cut
        b64url_encode(b'{"alg":"ES256"}') + f".{body}.{sig}",  # no kid
        f"{b64url_encode(b'[1]')}.{body}.{sig}",  # header not an object
        "é" + vec["es256"]["blob"],  # not ASCII
    ]
    for blob in odd:
        c, ref = both()
        reasons = []
        for engine in (c, ref):
            with pytest.raises(GrantRejected) as info:
                engine.accept_grant(blob)
            reasons.append(info.value.reason)
        assert reasons[0] == reasons[1], (blob[:40], reasons)

    c, ref = both()
    assert c.device_info() == ref.device_info()
    blob = vec["es256"]["blob"]
    c.accept_grant(blob)
    ref.accept_grant(blob)
    up = Uploader.for_grant(
        blob,
        ephemeral_private=X25519PrivateKey.from_private_bytes(
            bytes.fromhex(vec["keys"]["ephemeral_x25519_private"])
        ),
        device_public_key=c.public_key,
    )
    assert up.session_keys.raw.hex() == vec["es256"]["k_session"]
    assert c.status_message() == ref.status_message()
    message = up.credential_message(SSID, PASSWORD)
    assert c.receive_credentials(message) == ref.receive_credentials(message)
    assert c.status_message() == ref.status_message()
    assert c.finish(False, "ssid_not_found") == ref.finish(False, "ssid_not_found")
    assert c.last_report == ref.last_report and c.state == ref.state == "idle"
    assert c.last_iat == ref.last_iat == vec["grant"]["claims"]["iat"]


def test_c_framing_matches_the_profile(firmware: FirmwareLibrary) -> None:
    """The library's GATT framing against plugins/provisiond_ble/profile.py."""
    lib = firmware.lib
    value = os.urandom(1500)
    for mtu in (23, 185, 517):
        frames = profile.data_frames(value, mtu)
        out = ctypes.create_string_buffer(600)
        for i, frame in enumerate(frames):
            n = lib.pd_data_frame(value, len(value), mtu, i, out, len(out))
            assert out.raw[:n] == frame
        assert lib.pd_data_frame(value, len(value), mtu, len(frames), out, len(out)) == 0
        commit = ctypes.create_string_buffer(11)
        lib.pd_commit_frame(value, len(value), commit)
        assert commit.raw == profile.commit_frame(value)

        message = os.urandom(300)
        assembler = profile.StatusAssembler()
        count = lib.pd_fragment_count(len(message), mtu)
        assert count == len(profile.status_fragments(message, mtu))
        got = None
        for i in range(count):
            n = lib.pd_fragment(message, len(message), mtu, i, out, len(out))
            assert out.raw[:n] == profile.status_fragments(message, mtu)[i]
            got = assembler.feed(out.raw[:n])
        assert got == message

    plain = ctypes.create_string_buffer(128)
    n = lib.pd_plain_status(b"failed", b"replayed", b"grant", plain, len(plain))
    assert plain.raw[:n] == profile.plain_status("failed", "replayed", "grant")


def _b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
