"""The published test vectors still match the code, and an independent
re-computation (manual HKDF, PyJWT verification) agrees with them."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from provisiond.wifi.crypto import b64url_decode, decrypt_status
from provisiond.wifi.jws import GrantRejected
from provisiond.wifi.uploader import Uploader
from provisiond.wifi.vectors import generate
from provisiond_sim.reference import ReferenceDevice

VECTORS = Path(__file__).parent / "vectors" / "wifi-grant-v1.json"


@pytest.fixture(scope="module")
def vec() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 by hand, so the vector is not only checked against itself.
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def _device(vec: dict[str, Any], now: float) -> ReferenceDevice:
    return ReferenceDevice(
        vec["device"]["device_id"],
        X25519PrivateKey.from_private_bytes(bytes.fromhex(vec["keys"]["device_x25519_private"])),
        [vec["keys"]["gateway_jwk"]],
        now=lambda: now,
        nonce=bytes.fromhex(vec["device"]["nonce"]),
    )


def test_file_matches_generator(vec: dict[str, Any]) -> None:
    assert generate() == vec, "regenerate with: python -m provisiond.wifi.vectors"


def test_independent_recomputation(vec: dict[str, Any]) -> None:
    g = vec["grant"]
    blob = g["blob"]
    pub = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex(vec["keys"]["gateway_ed25519_private"])
    ).public_key()
    claims = jwt.decode(
        blob, pub, algorithms=["EdDSA"], audience="wifi-config", options={"verify_exp": False}
    )
    assert claims == g["claims"]
    assert jwt.get_unverified_header(blob)["kid"] == vec["keys"]["gateway_jwk"]["kid"]

    salt = hashlib.sha256(blob.encode("ascii")).digest()
    assert salt.hex() == g["salt_sha256_of_blob"]
    k = _hkdf_sha256(bytes.fromhex(g["z"]), salt, b"provisiond wifi-session v1", 64)
    assert k.hex() == g["k_session"] == g["k_up"] + g["k_down"]

    cred = vec["credential"]
    msg = bytes.fromhex(cred["message"])
    assert msg[:12].hex() == cred["nonce"]
    pt = AESGCM(k[:32]).decrypt(msg[:12], msg[12:], b"provisiond wifi-credential v1")
    assert pt.decode() == cred["plaintext"]

    hs = vec["hs256"]
    key = _hkdf_sha256(bytes.fromhex(hs["master_secret"]), b"\x00" * 32, hs["info"].encode(), 32)
    assert key.hex() == hs["device_key"]
    assert (
        jwt.decode(
            hs["blob"],
            key,
            algorithms=["HS256"],
            audience="wifi-config",
            options={"verify_exp": False},
        )
        == g["claims"]
    )


def test_reference_device_decrypts_vector(vec: dict[str, Any]) -> None:
    g = vec["grant"]
    device = _device(vec, g["claims"]["iat"] + 60)
    claims = device.accept_grant(g["blob"])
    assert claims.jti == g["claims"]["jti"]
    creds = device.receive_credentials(bytes.fromhex(vec["credential"]["message"]))
    assert (creds.ssid, creds.password, creds.security) == (
        vec["credential"]["ssid"],
        vec["credential"]["password"],
        vec["credential"]["security"],
    )
    # The device's own status messages are the vector's byte for byte
    # (deterministic: counter nonce, fixed key, sorted JSON).
    assert device.status("connecting").hex() == vec["status"][0]["message"]
    assert device.finish(False, "wrong_password").hex() == vec["status"][1]["message"]


def test_uploader_reproduces_vector(vec: dict[str, Any]) -> None:
    up = Uploader.for_grant(
        vec["grant"]["blob"],
        ephemeral_private=X25519PrivateKey.from_private_bytes(
            bytes.fromhex(vec["keys"]["ephemeral_x25519_private"])
        ),
        device_public_key=bytes.fromhex(vec["keys"]["device_x25519_public"]),
    )
    assert up.session_keys.raw.hex() == vec["grant"]["k_session"]
    cred = vec["credential"]
    msg = up.credential_message(
        cred["ssid"], cred["password"], cred["security"], nonce=bytes.fromhex(cred["nonce"])
    )
    assert msg.hex() == cred["message"]
    for st in vec["status"]:
        doc = up.read_status(bytes.fromhex(st["message"]))
        assert json.dumps(doc, separators=(",", ":"), sort_keys=True) == st["plaintext"]
        assert doc == decrypt_status(
            bytes.fromhex(vec["grant"]["k_down"]), st["counter"], bytes.fromhex(st["message"])
        )


def test_reject_vectors(vec: dict[str, Any]) -> None:
    ctx = vec["rejects"]["device_context"]
    for case in vec["rejects"]["cases"]:
        device = ReferenceDevice(
            ctx["device_id"],
            X25519PrivateKey.from_private_bytes(
                bytes.fromhex(vec["keys"]["device_x25519_private"])
            ),
            ctx["pinned"],
            now=lambda: ctx["now"],
            nonce=bytes.fromhex(ctx["nonce"]),
            leeway=ctx["leeway"],
        )
        with pytest.raises(GrantRejected) as info:
            device.accept_grant(case["blob"])
        assert info.value.reason == case["reason"], case["name"]
        assert device.state == "idle"
    # and the epk in every case is the vector's, so only the named check differs
    assert (
        b64url_decode(vec["grant"]["claims"]["epk"]).hex() == vec["keys"]["ephemeral_x25519_public"]
    )
