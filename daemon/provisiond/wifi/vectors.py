"""Generator of tests/vectors/wifi-grant-v1.json.

    python -m provisiond.wifi.vectors > tests/vectors/wifi-grant-v1.json

Every input is fixed (keys are SHA-256 of a label, so anyone can rebuild
them), and Ed25519 and HS256 are deterministic, so the output is the same
on every run; tests/test_wifi_vectors.py checks that it still is. ES256 has
no vector because ECDSA signatures are randomised.

Byte strings are hex unless the protocol itself carries them as base64url
(grant claims, JWKs), where both spellings are given.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.wifi.crypto import (
    CREDENTIAL_AAD,
    SESSION_INFO,
    STATUS_AAD,
    SessionKeys,
    b64url_encode,
    credential_plaintext,
    derive_session_key,
    encrypt_credentials,
    encrypt_status,
    hs256_device_key,
    status_nonce,
    status_plaintext,
    x25519_shared,
)
from provisiond.wifi.signing import SigningKey, hs256_kid, sign_grant, sign_grant_hs256

VERSION = "provisiond wifi-grant v1"
DEVICE_ID: Final = 42
IAT: Final = 1_750_000_000
JTI: Final = bytes(range(16))
DEVICE_NONCE: Final = bytes(range(0xA0, 0xB0))
CREDENTIAL_NONCE: Final = bytes(range(0xC0, 0xCC))


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"{VERSION} vector: {label}".encode("ascii")).digest()


def _jws(header: dict[str, Any], claims: dict[str, Any], signer: Any) -> str:
    # Hand-built tokens for the negative cases PyJWT (rightly) refuses to make.
    def seg(obj: dict[str, Any]) -> str:
        return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())

    signing_input = f"{seg(header)}.{seg(claims)}"
    return f"{signing_input}.{b64url_encode(signer(signing_input.encode()))}"


@dataclass(frozen=True)
class _Fixture:
    """The fixed inputs, and the grant and session keys made from them."""

    signing_priv: Ed25519PrivateKey
    key: SigningKey
    device_pub: bytes
    epk: bytes
    claims: dict[str, Any]
    blob: str
    z: bytes
    keys: SessionKeys


def _fixture() -> _Fixture:
    signing_priv = Ed25519PrivateKey.from_private_bytes(_seed("gateway ed25519"))
    device_priv = X25519PrivateKey.from_private_bytes(_seed("device x25519"))
    eph_priv = X25519PrivateKey.from_private_bytes(_seed("ephemeral x25519"))
    key = SigningKey.from_private_key(signing_priv)
    device_pub = device_priv.public_key().public_bytes_raw()
    epk = eph_priv.public_key().public_bytes_raw()
    claims: dict[str, Any] = {
        "iss": "gw-vector-01",
        "sub": str(DEVICE_ID),
        "aud": "wifi-config",
        "iat": IAT,
        "exp": IAT + 900,
        "jti": b64url_encode(JTI),
        "cap": 2,
        "epk": b64url_encode(epk),
        "dn": b64url_encode(DEVICE_NONCE),
    }
    blob = sign_grant(claims, key)
    z = x25519_shared(eph_priv, device_pub)
    return _Fixture(
        signing_priv, key, device_pub, epk, claims, blob, z, derive_session_key(z, blob)
    )


def _keys_section(fx: _Fixture) -> dict[str, Any]:
    return {
        "gateway_ed25519_private": _seed("gateway ed25519").hex(),
        "gateway_ed25519_public": fx.signing_priv.public_key().public_bytes_raw().hex(),
        "gateway_jwk": fx.key.public_jwk(),
        "device_x25519_private": _seed("device x25519").hex(),
        "device_x25519_public": fx.device_pub.hex(),
        "device_x25519_public_b64url": b64url_encode(fx.device_pub),
        "ephemeral_x25519_private": _seed("ephemeral x25519").hex(),
        "ephemeral_x25519_public": fx.epk.hex(),
    }


def _grant_section(fx: _Fixture) -> dict[str, Any]:
    return {
        "claims": fx.claims,
        "blob": fx.blob,
        "salt_sha256_of_blob": hashlib.sha256(fx.blob.encode("ascii")).hexdigest(),
        "z": fx.z.hex(),
        "k_session": fx.keys.raw.hex(),
        "k_up": fx.keys.k_up.hex(),
        "k_down": fx.keys.k_down.hex(),
    }


def _credential_section(fx: _Fixture) -> dict[str, Any]:
    ssid, password, security = "provisiond-lab", "correct horse battery staple", "wpa2-psk"
    return {
        "ssid": ssid,
        "password": password,
        "security": security,
        "plaintext": credential_plaintext(ssid, password, security).decode("utf-8"),
        "nonce": CREDENTIAL_NONCE.hex(),
        "message": encrypt_credentials(
            fx.keys.k_up, ssid, password, security, nonce=CREDENTIAL_NONCE
        ).hex(),
    }


def _status_section(fx: _Fixture) -> list[dict[str, Any]]:
    statuses = [
        {"state": "connecting", "grant_id": fx.claims["jti"]},
        {"state": "failed", "reason": "wrong_password", "grant_id": fx.claims["jti"]},
    ]
    return [
        {
            "counter": i,
            "nonce": status_nonce(i).hex(),
            "plaintext": status_plaintext(doc).decode("ascii"),
            "message": encrypt_status(fx.keys.k_down, i, doc).hex(),
        }
        for i, doc in enumerate(statuses)
    ]


def _hs256_section(fx: _Fixture) -> dict[str, Any]:
    master = _seed("hs256 master secret")
    hs_blob = sign_grant_hs256(fx.claims, master, DEVICE_ID)
    return {
        "master_secret": master.hex(),
        "info": f"provisiond grant-key v1|{DEVICE_ID}",
        "device_key": hs256_device_key(master, DEVICE_ID).hex(),
        "kid": hs256_kid(DEVICE_ID),
        "blob": hs_blob,
        "k_session": derive_session_key(fx.z, hs_blob).raw.hex(),
    }


def _rejects(
    blob: str,
    header: dict[str, Any],
    claims: dict[str, Any],
    sign: Callable[[bytes], bytes],
    public_raw: bytes,
    key_label: str,
) -> list[tuple[str, str, str]]:
    """(name, blob, reason) of grants a device pinned to `header`'s key must refuse."""
    tampered_parts = blob.split(".")
    tampered_parts[1] = b64url_encode(
        json.dumps({**claims, "sub": "43"}, separators=(",", ":")).encode()
    )
    return [
        ("alg_none", _jws({**header, "alg": "none"}, claims, lambda _m: b""), "alg_not_allowed"),
        (
            f"hs256_keyed_with_{key_label}_public_key",
            _jws(
                {**header, "alg": "HS256"},
                claims,
                lambda m: hmac.new(public_raw, m, hashlib.sha256).digest(),
            ),
            "alg_not_allowed",
        ),
        ("tampered_payload", ".".join(tampered_parts), "bad_signature"),
        ("unknown_kid", _jws({**header, "kid": "0000000000000000"}, claims, sign), "unknown_kid"),
        ("wrong_audience", _jws(header, {**claims, "aud": "other"}, sign), "wrong_audience"),
        ("wrong_subject", _jws(header, {**claims, "sub": "43"}, sign), "wrong_subject"),
        (
            "missing_cap",
            _jws(header, {k: v for k, v in claims.items() if k != "cap"}, sign),
            "missing_cap",
        ),
        (
            "expired",
            _jws(header, {**claims, "iat": IAT - 7200, "exp": IAT - 6300}, sign),
            "expired",
        ),
        ("not_yet_valid", _jws(header, {**claims, "iat": IAT + 600}, sign), "not_yet_valid"),
        (
            "wrong_nonce",
            _jws(header, {**claims, "dn": b64url_encode(bytes(16))}, sign),
            "wrong_nonce",
        ),
    ]


def _device_context(pinned: dict[str, Any]) -> dict[str, Any]:
    return {
        "device_id": DEVICE_ID,
        "now": IAT + 60,
        "nonce": DEVICE_NONCE.hex(),
        "last_iat": None,
        "has_clock": True,
        "leeway": 30,
        "pinned": [pinned],
    }


def _rejects_section(fx: _Fixture) -> dict[str, Any]:
    header = {"alg": "EdDSA", "kid": fx.key.kid, "typ": "JWT"}
    ed_pub = fx.signing_priv.public_key().public_bytes_raw()
    cases = _rejects(fx.blob, header, fx.claims, fx.signing_priv.sign, ed_pub, "ed25519")
    return {
        "device_context": _device_context(fx.key.public_jwk()),
        "cases": [{"name": n, "blob": b, "reason": r} for n, b, r in cases],
    }


def _es256_section(fx: _Fixture) -> dict[str, Any]:
    """The same grant signed with ES256 (devices on mbedTLS 2.x have no Ed25519)."""
    es_priv = ec.derive_private_key(int.from_bytes(_seed("gateway p256"), "big"), ec.SECP256R1())
    es_key = SigningKey.from_private_key(es_priv)
    header = {"alg": "ES256", "kid": es_key.kid, "typ": "JWT"}

    def es(msg: bytes) -> bytes:
        der = es_priv.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    blob = _jws(header, fx.claims, es)
    public = es_priv.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {
        "gateway_p256_private": _seed("gateway p256").hex(),
        "gateway_p256_public": public.hex(),
        "gateway_jwk": es_key.public_jwk(),
        "blob": blob,
        "k_session": derive_session_key(fx.z, blob).raw.hex(),
        "rejects": {
            "device_context": _device_context(es_key.public_jwk()),
            "cases": [
                {"name": n, "blob": b, "reason": r}
                for n, b, r in _rejects(blob, header, fx.claims, es, public, "p256")
            ],
        },
    }


def generate() -> dict[str, Any]:
    fx = _fixture()
    return {
        "version": VERSION,
        "description": (
            "Fixed keys -> grant -> K_session -> messages. Private keys are "
            "SHA-256('provisiond wifi-grant v1 vector: <label>')."
        ),
        "constants": {
            "session_info": SESSION_INFO.decode(),
            "credential_aad": CREDENTIAL_AAD.decode(),
            "status_aad": STATUS_AAD.decode(),
        },
        "keys": _keys_section(fx),
        "device": {"device_id": DEVICE_ID, "nonce": DEVICE_NONCE.hex()},
        "grant": _grant_section(fx),
        "credential": _credential_section(fx),
        "status": _status_section(fx),
        "hs256": _hs256_section(fx),
        "es256": _es256_section(fx),
        "rejects": _rejects_section(fx),
    }


def main() -> None:
    sys.stdout.write(json.dumps(generate(), indent=2) + "\n")


if __name__ == "__main__":
    main()
