"""WiFi grant crypto end to end, with real keys and no mocks (docs/wifi-crypto.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.wifi.crypto import (
    DecryptionFailed,
    InvalidPeerKey,
    WifiCredentials,
    b64url_decode,
    b64url_encode,
    decrypt_credentials,
    decrypt_status,
    derive_session_key,
    encrypt_credentials,
    encrypt_status,
    x25519_shared,
)
from provisiond.wifi.jws import GrantRejected, parse_unverified
from provisiond.wifi.signing import (
    DeviceNotWifiCapable,
    InsecureKeyFile,
    InvalidGrantRequest,
    IssuedGrant,
    KeyRing,
    KeyRingReadOnly,
    hs256_device_jwk,
    issue_grant,
    sign_grant,
)
from provisiond.wifi.uploader import Uploader, UploaderError
from provisiond_sim.reference import CredentialRejected, ReferenceDevice

T0 = 1_760_000_000.0
DEVICE_ID = 7
SSID, PASSWORD = "lab-net", "s3cret-passphrase!"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class World:
    ring: KeyRing
    device_priv: X25519PrivateKey
    clock: Clock

    @property
    def device_pub(self) -> bytes:
        return self.device_priv.public_key().public_bytes_raw()

    def device(self, **kw: Any) -> ReferenceDevice:
        kw.setdefault("now", self.clock)
        pinned = kw.pop("pinned", [self.ring.active.public_jwk()])
        return ReferenceDevice(DEVICE_ID, self.device_priv, pinned, **kw)

    def grant(self, **kw: Any) -> IssuedGrant:
        args: dict[str, Any] = {
            "gateway_id": "gw-test",
            "device_id": DEVICE_ID,
            "device_public_key": self.device_pub,
            "capabilities": 0x03,
            "expires_in": 900,
            "now": self.clock(),
        }
        args.update(kw)
        return issue_grant(self.ring, **args)

    def signed(self, **overrides: Any) -> str:
        """A validly signed grant with arbitrary claims, to test claim checks."""
        claims: dict[str, Any] = {
            "iss": "gw-test",
            "sub": str(DEVICE_ID),
            "aud": "wifi-config",
            "iat": int(self.clock()),
            "exp": int(self.clock()) + 900,
            "jti": b64url_encode(os.urandom(16)),
            "cap": 2,
            "epk": b64url_encode(X25519PrivateKey.generate().public_key().public_bytes_raw()),
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return sign_grant(claims, self.ring.active)


@pytest.fixture
def world(tmp_path: Path) -> World:
    ring = KeyRing.load_or_create(tmp_path / "keys", "EdDSA", now=T0)
    return World(ring, X25519PrivateKey.generate(), Clock())


def _forge(header: dict[str, Any], payload_segment: str, sign: Callable[[bytes], bytes]) -> str:
    h = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    return f"{h}.{payload_segment}.{b64url_encode(sign(f'{h}.{payload_segment}'.encode()))}"


def _reason(device: ReferenceDevice, blob: str) -> str:
    with pytest.raises(GrantRejected) as info:
        device.accept_grant(blob)
    return info.value.reason


# --------------------------------------------------------------------------- the three modes


def _complete_upload(device: ReferenceDevice, up: Uploader, blob: str) -> None:
    device.accept_grant(blob)
    assert device.state == "grant-accepted"
    assert up.read_status(device.status_message()) == {
        "state": "grant-accepted",
        "grant_id": up.grant_id,
    }
    creds = device.receive_credentials(up.credential_message(SSID, PASSWORD))
    assert (creds.ssid, creds.password, creds.security) == (SSID, PASSWORD, "wpa2-psk")
    assert device.state == "connecting"
    final = up.read_status(device.finish(True))
    assert final == {"state": "connected", "grant_id": up.grant_id}
    assert device.last_report == {"grant_id": up.grant_id, "state": "connected", "reason": None}
    assert device.state == "idle"


def test_end_to_end_mode(world: World) -> None:
    e = X25519PrivateKey.generate()  # the app's, never sent anywhere
    g = world.grant(app_public_key=e.public_key().public_bytes_raw())
    assert g.mode == "e2e" and g.session_key is None
    up = Uploader.for_grant(g.grant_blob, ephemeral_private=e, device_public_key=world.device_pub)
    _complete_upload(world.device(), up, g.grant_blob)


def test_server_generated_mode(world: World) -> None:
    g = world.grant()
    assert g.mode == "server" and g.session_key is not None and len(g.session_key) == 64
    up = Uploader.for_grant(g.grant_blob, session_key=g.session_key)
    device = world.device()
    _complete_upload(device, up, g.grant_blob)


def test_bridge_mode_is_e2e_with_in_process_key(world: World) -> None:
    # The BLE bridge generates e itself and asks for a grant with its public
    # half, exactly like an app: no separate issue path exists.
    e = X25519PrivateKey.generate()
    g = world.grant(app_public_key=e.public_key().public_bytes_raw())
    up = Uploader.for_grant(g.grant_blob, ephemeral_private=e, device_public_key=world.device_pub)
    device = world.device()
    device.accept_grant(g.grant_blob)
    # Both ends hold the same K_session, derived independently.
    assert device._session is not None
    assert device._session.keys.raw == up.session_keys.raw
    assert device.receive_credentials(up.credential_message(SSID, PASSWORD)).ssid == SSID


def test_es256_keyring(tmp_path: Path, world: World) -> None:
    ring = KeyRing.load_or_create(tmp_path / "es", "ES256", now=T0)
    assert ring.active.public_jwk()["kty"] == "EC"
    world.ring = ring
    g = world.grant()
    device = world.device()
    assert device.accept_grant(g.grant_blob).alg == "ES256"
    up = Uploader.for_grant(g.grant_blob, session_key=g.session_key)
    assert device.receive_credentials(up.credential_message(SSID, PASSWORD)).password == PASSWORD


def test_hs256_per_device_key(world: World) -> None:
    master = os.urandom(32)
    g = issue_grant(
        None,
        gateway_id="gw-test",
        device_id=DEVICE_ID,
        device_public_key=world.device_pub,
        capabilities=2,
        expires_in=900,
        now=T0,
        hs256_master_secret=master,
        algorithm="HS256",
    )
    device = world.device(pinned=[hs256_device_jwk(master, DEVICE_ID)])
    assert device.allowed_algorithms == {"HS256"}
    assert device.accept_grant(g.grant_blob).kid == f"hs256-dev-{DEVICE_ID}"
    # Another device's key (same master) does not verify this grant.
    other = hs256_device_jwk(master, DEVICE_ID + 1) | {"kid": f"hs256-dev-{DEVICE_ID}"}
    assert _reason(world.device(pinned=[other]), g.grant_blob) == "bad_signature"


# --------------------------------------------------------------------------- refusals


def test_alg_none_refused(world: World) -> None:
    payload = world.signed().split(".")[1]
    blob = _forge({"alg": "none", "kid": world.ring.active.kid}, payload, lambda _m: b"")
    assert _reason(world.device(), blob) == "alg_not_allowed"
    assert _reason(world.device(), blob.rsplit(".", 1)[0] + ".") == "alg_not_allowed"


def test_hs256_signed_with_public_key_refused(world: World) -> None:
    payload = world.signed().split(".")[1]
    kid = world.ring.active.kid
    pub = b64url_decode(world.ring.active.public_jwk()["x"])

    def mac(m: bytes) -> bytes:
        return hmac.new(pub, m, hashlib.sha256).digest()

    blob = _forge({"alg": "HS256", "kid": kid}, payload, mac)
    assert _reason(world.device(), blob) == "alg_not_allowed"
    # Even a device that allows HS256 (for some other pinned oct key) must
    # not let a token move the Ed25519 key to HMAC.
    both = world.device(
        pinned=[world.ring.active.public_jwk(), hs256_device_jwk(os.urandom(32), DEVICE_ID)],
        allowed_algorithms=["EdDSA", "HS256"],
    )
    assert _reason(both, blob) == "alg_not_allowed"


def test_expired_refused(world: World) -> None:
    g = world.grant(expires_in=60)
    world.clock.t += 60 + 31  # past exp plus leeway
    assert _reason(world.device(), g.grant_blob) == "expired"


def test_not_yet_valid_refused(world: World) -> None:
    device = world.device()
    assert _reason(device, world.signed(iat=int(T0) + 120)) == "not_yet_valid"
    assert _reason(device, world.signed(nbf=int(T0) + 120)) == "not_yet_valid"
    # Within leeway is fine: gateway and device clocks are never identical.
    device.accept_grant(world.signed(iat=int(T0) + 20))


def test_wrong_audience_refused(world: World) -> None:
    assert _reason(world.device(), world.signed(aud="provision")) == "wrong_audience"
    assert _reason(world.device(), world.signed(aud=["wifi-config"])) == "wrong_audience"


def test_wrong_subject_refused(world: World) -> None:
    assert _reason(world.device(), world.signed(sub=str(DEVICE_ID + 1))) == "wrong_subject"


def test_missing_cap_refused(world: World) -> None:
    assert _reason(world.device(), world.signed(cap=None)) == "missing_cap"
    assert _reason(world.device(), world.signed(cap=1)) == "missing_cap"


def test_tampered_payload_refused(world: World) -> None:
    h, p, s = world.grant().grant_blob.split(".")
    claims = json.loads(b64url_decode(p))
    claims["exp"] += 3600
    p2 = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    assert _reason(world.device(), f"{h}.{p2}.{s}") == "bad_signature"
    # Flip one bit of the signature (replacing characters could leave it unchanged).
    sig = bytearray(b64url_decode(s))
    sig[0] ^= 0x01
    assert _reason(world.device(), f"{h}.{p}.{b64url_encode(bytes(sig))}") == "bad_signature"


def test_replayed_jti_refused(world: World) -> None:
    device = world.device()
    g = world.grant()
    device.accept_grant(g.grant_blob)
    device.finish(False, "ssid_not_found")
    assert _reason(device, g.grant_blob) == "replayed"


def test_stale_iat_refused_without_clock(world: World) -> None:
    device = world.device(has_clock=False)
    newer = world.grant()
    older = world.grant(now=T0 - 10)
    same_second = world.grant()
    device.accept_grant(newer.grant_blob)
    assert _reason(device, older.grant_blob) == "stale_iat"
    assert _reason(device, same_second.grant_blob) == "stale_iat"
    # Without a clock, expiry cannot be checked; monotonic iat is the guard.
    world.clock.t += 10_000
    device.accept_grant(world.grant().grant_blob)


def test_wrong_device_nonce_refused(world: World) -> None:
    device = world.device()
    assert _reason(device, world.grant(device_nonce=os.urandom(16)).grant_blob) == "wrong_nonce"
    device.accept_grant(world.grant(device_nonce=device.nonce).grant_blob)
    # The nonce moved on; a grant minted for the old one is dead.
    world.clock.t += 1
    old_nonce_grant = world.grant(device_nonce=b64url_decode(device.device_info()["nonce"]))
    device.finish(True)
    assert _reason(device, old_nonce_grant.grant_blob) == "wrong_nonce"


def test_required_nonce(world: World) -> None:
    device = world.device(has_clock=False, require_nonce=True)
    assert _reason(device, world.grant().grant_blob) == "wrong_nonce"
    device.accept_grant(world.grant(device_nonce=device.nonce).grant_blob)


def test_unknown_kid_refused(world: World, tmp_path: Path) -> None:
    other = KeyRing.load_or_create(tmp_path / "other", "EdDSA", now=T0)
    world.ring, pinned = other, [world.ring.active.public_jwk()]
    assert _reason(world.device(pinned=pinned), world.grant().grant_blob) == "unknown_kid"


def test_malformed_refused(world: World) -> None:
    device = world.device()
    for blob in ["", "a.b", "a.b.c.d", "!!!.x.y", "e30.e30.", "x" * 5000]:
        assert _reason(device, blob) in {"malformed", "alg_not_allowed"}
    assert device.state == "idle"


def test_device_without_wifi_capability_refused_at_issue(world: World) -> None:
    with pytest.raises(DeviceNotWifiCapable) as info:
        world.grant(capabilities=0x01)
    assert info.value.device_id == DEVICE_ID


def test_issue_rejects_bad_inputs(world: World) -> None:
    with pytest.raises(InvalidGrantRequest) as info:
        world.grant(expires_in=3601)
    assert info.value.field == "expires_in_seconds"
    with pytest.raises(InvalidGrantRequest) as info:
        world.grant(app_public_key=bytes(32))  # low-order point
    assert info.value.field == "app_public_key"
    with pytest.raises(InvalidGrantRequest) as info:
        world.grant(device_public_key=b"short")
    assert info.value.field == "device_public_key"


# --------------------------------------------------------------------------- confidentiality


def test_sniffed_grant_alone_does_not_decrypt(world: World) -> None:
    e = X25519PrivateKey.generate()
    g = world.grant(app_public_key=e.public_key().public_bytes_raw())
    up = Uploader.for_grant(g.grant_blob, ephemeral_private=e, device_public_key=world.device_pub)
    message = up.credential_message(SSID, PASSWORD)

    # Everything a sniffer has: the blob, its epk, the device's public key.
    epk = b64url_decode(parse_unverified(g.grant_blob)["epk"])
    attacker = X25519PrivateKey.generate()
    guesses = [
        epk,
        world.device_pub,
        hashlib.sha256(g.grant_blob.encode()).digest(),
        x25519_shared(attacker, epk),
        x25519_shared(attacker, world.device_pub),
    ]
    for z in guesses:
        with pytest.raises(DecryptionFailed):
            decrypt_credentials(derive_session_key(z, g.grant_blob).k_up, message)
    assert PASSWORD.encode() not in message


def test_low_order_points_rejected() -> None:
    priv = X25519PrivateKey.generate()
    # 0 and 1 and a point of order 8 (from the libsodium blocklist).
    order8 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
    for point in [bytes(32), (1).to_bytes(32, "little"), order8]:
        with pytest.raises(InvalidPeerKey) as info:
            x25519_shared(priv, point)
        assert info.value.reason == "low_order"
    with pytest.raises(InvalidPeerKey):
        x25519_shared(priv, b"\x09" * 31)


# --------------------------------------------------------------------------- single use and recovery


def test_one_credential_message_per_grant(world: World) -> None:
    g = world.grant()
    up = Uploader.for_grant(g.grant_blob, session_key=g.session_key)
    msg = up.credential_message(SSID, PASSWORD)
    with pytest.raises(UploaderError) as info:
        up.credential_message(SSID, PASSWORD)
    assert info.value.reason == "already_used"
    device = world.device()
    device.accept_grant(g.grant_blob)
    device.receive_credentials(msg)
    with pytest.raises(CredentialRejected) as rej:
        device.receive_credentials(msg)
    assert rej.value.reason == "already_used"


def test_fresh_grant_after_failed_attempt_without_reset(world: World) -> None:
    device = world.device()
    g1 = world.grant(device_nonce=device.nonce)
    up1 = Uploader.for_grant(g1.grant_blob, session_key=g1.session_key)
    device.accept_grant(g1.grant_blob)
    device.receive_credentials(up1.credential_message(SSID, "wrong-password"))
    assert up1.read_status(device.finish(False, "wrong_password")) == {
        "state": "failed",
        "reason": "wrong_password",
        "grant_id": g1.jti,
    }
    assert device.state == "idle"
    assert device.last_report == {"grant_id": g1.jti, "state": "failed", "reason": "wrong_password"}

    # A corrupted credential message also ends in "failed", then idle.
    world.clock.t += 5
    g2 = world.grant(device_nonce=device.nonce)
    device.accept_grant(g2.grant_blob)
    with pytest.raises(CredentialRejected) as rej:
        device.receive_credentials(b"\x00" * 64)
    assert rej.value.reason == "decrypt_failed"
    up2 = Uploader.for_grant(g2.grant_blob, session_key=g2.session_key)
    assert up2.read_status(device.finish(False))["reason"] == "decrypt_failed"

    world.clock.t += 5
    g3 = world.grant(device_nonce=device.nonce)
    up3 = Uploader.for_grant(g3.grant_blob, session_key=g3.session_key)
    device.accept_grant(g3.grant_blob)
    assert device.receive_credentials(up3.credential_message(SSID, PASSWORD)).password == PASSWORD
    assert up3.read_status(device.finish(True))["state"] == "connected"


def test_busy_while_connecting(world: World) -> None:
    device = world.device()
    g = world.grant()
    device.accept_grant(g.grant_blob)
    up = Uploader.for_grant(g.grant_blob, session_key=g.session_key)
    device.receive_credentials(up.credential_message(SSID, PASSWORD))
    world.clock.t += 1
    assert _reason(device, world.grant().grant_blob) == "busy"


def test_status_counter_is_the_nonce() -> None:
    k = os.urandom(32)
    msg = encrypt_status(k, 3, {"state": "connecting", "grant_id": "j"})
    assert decrypt_status(k, 3, msg) == {"state": "connecting", "grant_id": "j"}
    for wrong in (2, 4):
        with pytest.raises(DecryptionFailed):
            decrypt_status(k, wrong, msg)


def test_uploader_checks_epk(world: World) -> None:
    g = world.grant(app_public_key=X25519PrivateKey.generate().public_key().public_bytes_raw())
    with pytest.raises(UploaderError) as info:
        Uploader.for_grant(
            g.grant_blob,
            ephemeral_private=X25519PrivateKey.generate(),
            device_public_key=world.device_pub,
        )
    assert info.value.reason == "epk_mismatch"


def test_issued_grant_carries_its_claims(world: World) -> None:
    e = X25519PrivateKey.generate()
    g = world.grant(app_public_key=e.public_key().public_bytes_raw())
    claims = parse_unverified(g.grant_blob)
    assert g.epk == e.public_key().public_bytes_raw() == b64url_decode(claims["epk"])
    assert (g.jti, g.iat, g.exp) == (claims["jti"], claims["iat"], claims["exp"])
    server = world.grant()
    assert server.epk == b64url_decode(parse_unverified(server.grant_blob)["epk"])


def test_uploader_given_the_claims_it_issued_matches_one_that_reads_them(world: World) -> None:
    # The BLE bridge knows jti and epk from its own GrantResult and passes them
    # instead of parsing the blob again; the result must not differ.
    e = X25519PrivateKey.generate()
    g = world.grant(app_public_key=e.public_key().public_bytes_raw())
    read = Uploader.for_grant(g.grant_blob, ephemeral_private=e, device_public_key=world.device_pub)
    given = Uploader.for_grant(
        g.grant_blob,
        ephemeral_private=e,
        device_public_key=world.device_pub,
        grant_id=g.jti,
        epk=g.epk,
    )
    assert given.grant_id == read.grant_id == g.jti
    assert given.session_keys.raw == read.session_keys.raw
    _complete_upload(world.device(), given, g.grant_blob)
    with pytest.raises(UploaderError) as info:
        Uploader.for_grant(
            g.grant_blob,
            ephemeral_private=e,
            device_public_key=world.device_pub,
            grant_id=g.jti,
            epk=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        )
    assert info.value.reason == "epk_mismatch"


# --------------------------------------------------------------------------- keys


def test_key_rotation(tmp_path: Path, world: World) -> None:
    directory = tmp_path / "keys"
    old = world.ring.active
    old_grant = world.grant()

    world.clock.t = T0 + 100
    new = world.ring.rotate(T0 + 100, max_grant_lifetime=3600)
    assert world.ring.active.kid == new.kid != old.kid
    assert world.grant().kid == new.kid
    assert [j["kid"] for j in world.ring.verification_jwks(T0 + 200)] == [new.kid, old.kid]

    # A device holding both keys still verifies the grant signed before rotation.
    device = world.device(pinned=world.ring.verification_jwks(T0 + 200))
    device.accept_grant(old_grant.grant_blob)

    # Persisted: a restart sees the same ring.
    reloaded = KeyRing.load_or_create(directory, "EdDSA", now=T0 + 200)
    assert {k.kid for k in reloaded.keys} == {old.kid, new.kid}
    assert reloaded.active.kid == new.kid

    after = T0 + 100 + 3600
    assert [j["kid"] for j in world.ring.verification_jwks(after)] == [new.kid]
    assert world.ring.prune(after) == [old.kid]
    assert not (directory / f"{old.kid}.pem").exists()
    assert [k.kid for k in KeyRing.load_or_create(directory, "EdDSA", now=after).keys] == [new.kid]


def test_alg_change_rotates(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path, "EdDSA", now=T0)
    ring2 = KeyRing.load_or_create(tmp_path, "ES256", now=T0 + 1)
    assert ring2.active.alg == "ES256"
    assert {j["alg"] for j in ring2.verification_jwks(T0 + 2)} == {"EdDSA", "ES256"}
    assert ring.active.alg == "EdDSA"


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)  # the worst case: files would be 0666 if not forced
    try:
        yield
    finally:
        os.umask(previous)


def test_key_files_mode_0600(tmp_path: Path, open_umask: None) -> None:
    directory = tmp_path / "keys"
    ring = KeyRing.load_or_create(directory, "EdDSA", now=T0)
    ring.rotate(T0 + 1)
    files = list(directory.iterdir())
    assert len([f for f in files if f.suffix == ".pem"]) == 2
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_world_readable_key_refused(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path, "EdDSA", now=T0)
    (tmp_path / f"{ring.active.kid}.pem").chmod(0o644)
    with pytest.raises(InsecureKeyFile):
        KeyRing.load_or_create(tmp_path, "EdDSA", now=T0)


def test_load_files(tmp_path: Path, world: World) -> None:
    src = KeyRing.load_or_create(tmp_path / "src", "EdDSA", now=T0)
    src.rotate(T0 + 1)
    paths = [tmp_path / "src" / f"{k.kid}.pem" for k in reversed(src.keys)]
    ring = KeyRing.load_files(paths)
    assert ring.active.kid == src.active.kid
    assert len(ring.verification_jwks(T0 + 10**9)) == 2
    with pytest.raises(KeyRingReadOnly):
        ring.rotate(T0 + 2)


# --------------------------------------------------------------------------- hygiene


def test_reprs_hide_secrets(world: World) -> None:
    creds = WifiCredentials(ssid=SSID, password=PASSWORD, security="wpa2-psk")
    assert PASSWORD not in repr(creds) and PASSWORD not in str(creds)
    g = world.grant()
    assert g.session_key is not None
    assert g.session_key.hex() not in repr(g) and str(list(g.session_key)) not in repr(g)
    keys = derive_session_key(os.urandom(32), g.grant_blob)
    assert "raw=" not in repr(keys) and "k_up=" not in repr(keys)
    k = os.urandom(32)
    msg = encrypt_credentials(k, SSID, PASSWORD, "wpa2-psk")
    assert PASSWORD not in repr(decrypt_credentials(k, msg))


def test_b64url_strict() -> None:
    assert b64url_decode(b64url_encode(b"\xff\xfe")) == b"\xff\xfe"
    assert b64url_encode(b"\xff\xfe") == "__4"
    for bad in ["__4=", "//4", "__4 ", "_", "__5", "a\n"]:
        with pytest.raises(ValueError):
            b64url_decode(bad)
