"""Generator of tests/vectors/wifi-grant-v1.json.

    python -m provisiond.wifi.vectors > tests/vectors/wifi-grant-v1.json

Every input is fixed (keys are SHA-256 of a label, so anyone can rebuild
them), and Ed25519 and HS256 are deterministic, so the output is the same
on every run; tests/test_wifi_vectors.py checks that it still is. The ES256
section (for firmware on mbedTLS, which has no Ed25519) signs with RFC 6979
deterministic ECDSA for the same reason.

Byte strings are hex unless the protocol itself carries them as base64url
(grant claims, JWKs), where both spellings are given.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.wifi.crypto import (
    CREDENTIAL_AAD,
    SESSION_INFO,
    STATUS_AAD,
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


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"{VERSION} vector: {label}".encode("ascii")).digest()


def _jws(header: dict[str, Any], claims: dict[str, Any], signer: Any) -> str:
    # Hand-built tokens for the negative cases PyJWT (rightly) refuses to make.
    def seg(obj: dict[str, Any]) -> str:
        return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())

    signing_input = f"{seg(header)}.{seg(claims)}"
    return f"{signing_input}.{b64url_encode(signer(signing_input.encode()))}"


def _rejects(
    blob: str,
    header: dict[str, Any],
    claims: dict[str, Any],
    sign: Callable[[bytes], bytes],
    public_raw: bytes,
    key_label: str,
) -> list[tuple[str, str, str]]:
    """Grants a device pinned to `header`'s key must refuse, one check each."""
    iat = claims["iat"]
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
            _jws(header, {**claims, "iat": iat - 7200, "exp": iat - 6300}, sign),
            "expired",
        ),
        ("not_yet_valid", _jws(header, {**claims, "iat": iat + 600}, sign), "not_yet_valid"),
        (
            "wrong_nonce",
            _jws(header, {**claims, "dn": b64url_encode(bytes(16))}, sign),
            "wrong_nonce",
        ),
    ]


def generate() -> dict[str, Any]:
    signing_priv = Ed25519PrivateKey.from_private_bytes(_seed("gateway ed25519"))
    device_priv = X25519PrivateKey.from_private_bytes(_seed("device x25519"))
    eph_priv = X25519PrivateKey.from_private_bytes(_seed("ephemeral x25519"))
    key = SigningKey.from_private_key(signing_priv)
    device_pub = device_priv.public_key().public_bytes_raw()
    epk = eph_priv.public_key().public_bytes_raw()

    device_id = 42
    iat = 1_750_000_000
    jti = bytes(range(16))
    dn = bytes(range(0xA0, 0xB0))
    claims: dict[str, Any] = {
        "iss": "gw-vector-01",
        "sub": str(device_id),
        "aud": "wifi-config",
        "iat": iat,
        "exp": iat + 900,
        "jti": b64url_encode(jti),
        "cap": 2,
        "epk": b64url_encode(epk),
        "dn": b64url_encode(dn),
    }
    blob = sign_grant(claims, key)
    z = x25519_shared(eph_priv, device_pub)
    keys = derive_session_key(z, blob)

    cred_nonce = bytes(range(0xC0, 0xCC))
    ssid, password, security = "provisiond-lab", "correct horse battery staple", "wpa2-psk"
    cred_msg = encrypt_credentials(keys.k_up, ssid, password, security, nonce=cred_nonce)

    statuses = [
        {"state": "connecting", "grant_id": claims["jti"]},
        {"state": "failed", "reason": "wrong_password", "grant_id": claims["jti"]},
    ]

    master = _seed("hs256 master secret")
    hs_key = hs256_device_key(master, device_id)
    hs_blob = sign_grant_hs256(claims, master, device_id)

    header = {"alg": "EdDSA", "kid": key.kid, "typ": "JWT"}

    def ed(msg: bytes) -> bytes:
        return signing_priv.sign(msg)

    ed_pub = signing_priv.public_key().public_bytes_raw()
    rejects = _rejects(blob, header, claims, ed, ed_pub, "ed25519")

    es_priv = ec.derive_private_key(int.from_bytes(_seed("gateway p256"), "big"), ec.SECP256R1())
    es_key = SigningKey.from_private_key(es_priv)
    es_header = {"alg": "ES256", "kid": es_key.kid, "typ": "JWT"}

    def es(msg: bytes) -> bytes:
        der = es_priv.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    es_blob = _jws(es_header, claims, es)
    es_pub = es_priv.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    es_context = {
        "device_id": device_id,
        "now": iat + 60,
        "nonce": dn.hex(),
        "last_iat": None,
        "has_clock": True,
        "leeway": 30,
        "pinned": [es_key.public_jwk()],
    }

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
        "keys": {
            "gateway_ed25519_private": _seed("gateway ed25519").hex(),
            "gateway_ed25519_public": ed_pub.hex(),
            "gateway_jwk": key.public_jwk(),
            "device_x25519_private": _seed("device x25519").hex(),
            "device_x25519_public": device_pub.hex(),
            "device_x25519_public_b64url": b64url_encode(device_pub),
            "ephemeral_x25519_private": _seed("ephemeral x25519").hex(),
            "ephemeral_x25519_public": epk.hex(),
        },
        "device": {"device_id": device_id, "nonce": dn.hex()},
        "grant": {
            "claims": claims,
            "blob": blob,
            "salt_sha256_of_blob": hashlib.sha256(blob.encode("ascii")).hexdigest(),
            "z": z.hex(),
            "k_session": keys.raw.hex(),
            "k_up": keys.k_up.hex(),
            "k_down": keys.k_down.hex(),
        },
        "credential": {
            "ssid": ssid,
            "password": password,
            "security": security,
            "plaintext": credential_plaintext(ssid, password, security).decode("utf-8"),
            "nonce": cred_nonce.hex(),
            "message": cred_msg.hex(),
        },
        "status": [
            {
                "counter": i,
                "nonce": status_nonce(i).hex(),
                "plaintext": status_plaintext(doc).decode("ascii"),
                "message": encrypt_status(keys.k_down, i, doc).hex(),
            }
            for i, doc in enumerate(statuses)
        ],
        "hs256": {
            "master_secret": master.hex(),
            "info": f"provisiond grant-key v1|{device_id}",
            "device_key": hs_key.hex(),
            "kid": hs256_kid(device_id),
            "blob": hs_blob,
            "k_session": derive_session_key(z, hs_blob).raw.hex(),
        },
        "es256": {
            "gateway_p256_private": _seed("gateway p256").hex(),
            "gateway_p256_public": es_pub.hex(),
            "gateway_jwk": es_key.public_jwk(),
            "blob": es_blob,
            "k_session": derive_session_key(z, es_blob).raw.hex(),
            "rejects": {
                "device_context": es_context,
                "cases": [
                    {"name": n, "blob": b, "reason": r}
                    for n, b, r in _rejects(es_blob, es_header, claims, es, es_pub, "p256")
                ],
            },
        },
        "rejects": {
            "device_context": {
                "device_id": device_id,
                "now": iat + 60,
                "nonce": dn.hex(),
                "last_iat": None,
                "has_clock": True,
                "leeway": 30,
                "pinned": [key.public_jwk()],
            },
            "cases": [{"name": n, "blob": b, "reason": r} for n, b, r in rejects],
        },
    }


def main() -> None:
    sys.stdout.write(json.dumps(generate(), indent=2) + "\n")


if __name__ == "__main__":
    main()
