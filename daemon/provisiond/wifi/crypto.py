"""Pure cryptographic primitives of the WiFi grant protocol (docs/wifi-crypto.md, v1).

Everything in this module is deterministic given its inputs (random nonces
can be injected), synchronous and free of I/O, so that the gateway, the BLE
bridge, the reference device and the test-vector generator all share one
implementation and the daemon can call it from a worker thread.

Firmware authors: docs/wifi-crypto.md describes the same steps in prose, and
tests/vectors/wifi-grant-v1.json pins the exact bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from provisiond.payloads import REASON_CODE

# Domain-separation strings. They carry the protocol version, so a future v2
# can never be confused with v1 even if the message layout stays the same.
SESSION_INFO: Final = b"provisiond wifi-session v1"
# Grant claims both sides agree on (docs/wifi-crypto.md).
GRANT_AUDIENCE: Final = "wifi-config"
CAP_WIFI_UPLOAD: Final = 0x02
# The longest life a grant may claim; devices without a clock rely on it.
MAX_GRANT_LIFETIME: Final = 3600
CREDENTIAL_AAD: Final = b"provisiond wifi-credential v1"
STATUS_AAD: Final = b"provisiond wifi-status v1"
GRANT_KEY_INFO_PREFIX: Final = b"provisiond grant-key v1|"

X25519_KEY_LEN: Final = 32
SESSION_KEY_LEN: Final = 64
# AES-GCM nonce: the random prefix of a credential message, the counter of a status.
GCM_NONCE_LEN: Final = 12
TAG_LEN: Final = 16
# A BLE characteristic write is reassembled in device RAM; a hard ceiling keeps
# a hostile uploader from making a small device allocate without bound.
MAX_CREDENTIAL_MESSAGE: Final = 1024
MAX_STATUS_MESSAGE: Final = 512
MAX_COUNTER: Final = (1 << 96) - 1

SECURITY_TYPES: Final = frozenset({"open", "wpa2-psk", "wpa3-sae", "wpa2-wpa3"})
STATUS_STATES: Final = frozenset({"idle", "grant-accepted", "connecting", "connected", "failed"})
_HEX64_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_\-]*")


class WifiCryptoError(Exception):
    """Base of every error raised by the WiFi grant primitives."""


class InvalidPeerKey(WifiCryptoError, ValueError):
    """A peer's X25519 public key is malformed or a low-order point."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid X25519 peer key: {reason}")
        self.reason = reason


class DecryptionFailed(WifiCryptoError):
    """An AEAD message did not authenticate (wrong key, counter or tampering)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"{kind} message failed to decrypt")
        self.kind = kind


class InvalidCredentials(WifiCryptoError, ValueError):
    """Credential fields violate the v1 plaintext rules; `field` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidStatus(WifiCryptoError, ValueError):
    """A status document violates the v1 rules; `field` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- base64url


def b64url_encode(data: bytes) -> str:
    """base64url without padding, as JOSE uses it everywhere."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of `b64url_encode`; raises ValueError on anything else.

    Padding, whitespace, the standard-alphabet `+/` and non-canonical trailing
    bits are all refused: two different strings decoding to the same bytes
    would let a signed blob be re-spelled without breaking a naive comparison.
    """
    if not isinstance(text, str):
        raise ValueError("base64url input must be str")
    if not _B64URL_RE.fullmatch(text):
        raise ValueError("invalid base64url character")
    if len(text) % 4 == 1:
        raise ValueError("invalid base64url length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:  # pragma: no cover - regex already excludes this
        raise ValueError("invalid base64url") from exc
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


# --------------------------------------------------------------------------- key agreement


@dataclass(frozen=True)
class SessionKeys:
    """K_session split into its two directions; repr never shows key bytes."""

    raw: bytes = field(repr=False)
    k_up: bytes = field(repr=False)
    k_down: bytes = field(repr=False)

    @classmethod
    def from_raw(cls, raw: bytes) -> SessionKeys:
        if len(raw) != SESSION_KEY_LEN:
            raise ValueError(f"session key must be {SESSION_KEY_LEN} bytes")
        return cls(raw=raw, k_up=raw[:32], k_down=raw[32:])


def x25519_shared(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Z = X25519(private, peer_public), refusing low-order peer points.

    A low-order point forces Z to all zeros whatever our private key is, so
    the session key would be known to anyone; that must never be used.
    """
    if len(peer_public) != X25519_KEY_LEN:
        raise InvalidPeerKey("length")
    try:
        z = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        # OpenSSL refuses the all-zero result itself; keep one exception type.
        raise InvalidPeerKey("low_order") from exc
    if hmac.compare_digest(z, bytes(X25519_KEY_LEN)):
        raise InvalidPeerKey("low_order")
    return z


def derive_session_key(z: bytes, grant_blob: str) -> SessionKeys:
    """K_session = HKDF-SHA256(Z, salt=SHA-256(grant_blob), info, 64 bytes).

    Salting with the blob binds the keys to this one grant: a replayed or
    altered blob, even with the same epk, yields unrelated keys.
    """
    if len(z) != X25519_KEY_LEN:
        raise ValueError("Z must be 32 bytes")
    salt = hashlib.sha256(grant_blob.encode("ascii")).digest()
    raw = HKDF(
        algorithm=hashes.SHA256(), length=SESSION_KEY_LEN, salt=salt, info=SESSION_INFO
    ).derive(z)
    return SessionKeys.from_raw(raw)


def hs256_device_key(master_secret: bytes, device_id: int) -> bytes:
    """Per-device HS256 grant key, so one leaked device key forges nothing else."""
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise ValueError("device_id must be a non-negative int")
    if len(master_secret) < 32:
        raise ValueError("HS256 master secret must be at least 32 bytes")
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=GRANT_KEY_INFO_PREFIX + str(device_id).encode("ascii"),
    ).derive(master_secret)


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class WifiCredentials:
    """Decrypted credentials; the password is kept out of repr so it cannot
    end up in a log line or a traceback by accident."""

    ssid: str
    password: str = field(repr=False)
    security: str

    def __post_init__(self) -> None:
        _validate_credentials(self.ssid, self.password, self.security)


def _validate_credentials(ssid: Any, password: Any, security: Any) -> None:
    if not isinstance(ssid, str) or not 1 <= len(ssid.encode("utf-8")) <= 32:
        raise InvalidCredentials("ssid", "must be 1..32 bytes of UTF-8")
    if not isinstance(security, str) or security not in SECURITY_TYPES:
        raise InvalidCredentials("security", f"must be one of {sorted(SECURITY_TYPES)}")
    if not isinstance(password, str):
        raise InvalidCredentials("password", "must be a string")
    if security == "open":
        if password:
            raise InvalidCredentials("password", "must be empty for an open network")
    elif security == "wpa3-sae":
        # SAE has no PSK length rule; the bound only keeps messages small.
        if not 1 <= len(password.encode("utf-8")) <= 128:
            raise InvalidCredentials("password", "must be 1..128 bytes")
    elif not (
        (8 <= len(password) <= 63 and password.isascii() and password.isprintable())
        or _HEX64_RE.fullmatch(password)
    ):
        # IEEE 802.11i: a passphrase is 8..63 printable ASCII, or the raw PSK as 64 hex.
        raise InvalidCredentials("password", "must be 8..63 printable ASCII or 64 hex digits")


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are where JSON parsers disagree; refuse them outright so
    # the device and the uploader can never read different values.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _loads_object(data: bytes) -> dict[str, Any]:
    parsed = json.loads(data.decode("utf-8"), object_pairs_hook=_strict_object)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return parsed


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check_key(key: bytes, name: str) -> None:
    if len(key) != 32:
        raise ValueError(f"{name} must be 32 bytes")


def credential_plaintext(ssid: str, password: str, security: str) -> bytes:
    """The exact plaintext bytes (compact JSON, this key order, UTF-8)."""
    _validate_credentials(ssid, password, security)
    return _dumps({"ssid": ssid, "password": password, "security": security})


def encrypt_credentials(
    k_up: bytes, ssid: str, password: str, security: str, *, nonce: bytes | None = None
) -> bytes:
    """nonce(12) || AES-256-GCM(K_up, nonce, plaintext, AAD) ciphertext+tag.

    A random nonce is safe because K_up is fresh per grant and encrypts a
    single message; `nonce` exists only so test vectors are reproducible.
    """
    _check_key(k_up, "k_up")
    if nonce is None:
        nonce = os.urandom(GCM_NONCE_LEN)
    if len(nonce) != GCM_NONCE_LEN:
        raise ValueError("nonce must be 12 bytes")
    plaintext = credential_plaintext(ssid, password, security)
    return nonce + AESGCM(k_up).encrypt(nonce, plaintext, CREDENTIAL_AAD)


def _open(key: bytes, nonce: bytes, sealed: bytes, aad: bytes, kind: str) -> bytes:
    """AES-GCM decryption; a forged or damaged message is DecryptionFailed(kind)."""
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag as exc:
        raise DecryptionFailed(kind) from exc


def decrypt_credentials(k_up: bytes, message: bytes) -> WifiCredentials:
    """Authenticate and parse a credential message; never returns partial data."""
    _check_key(k_up, "k_up")
    if not GCM_NONCE_LEN + TAG_LEN < len(message) <= MAX_CREDENTIAL_MESSAGE:
        raise DecryptionFailed("credential")
    plaintext = _open(
        k_up, message[:GCM_NONCE_LEN], message[GCM_NONCE_LEN:], CREDENTIAL_AAD, "credential"
    )
    try:
        doc = _loads_object(plaintext)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCredentials("plaintext", "not a JSON object") from exc
    if set(doc) != {"ssid", "password", "security"}:
        raise InvalidCredentials("plaintext", "must hold exactly ssid, password, security")
    return WifiCredentials(ssid=doc["ssid"], password=doc["password"], security=doc["security"])


# --------------------------------------------------------------------------- status


def status_nonce(counter: int) -> bytes:
    """96-bit big-endian counter; implicit, so it costs no bytes over BLE."""
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter <= MAX_COUNTER:
        raise ValueError("status counter out of range")
    return counter.to_bytes(GCM_NONCE_LEN, "big")


def _validate_status(doc: Mapping[str, Any]) -> dict[str, str]:
    unknown = set(doc) - {"state", "reason", "grant_id"}
    if unknown:
        raise InvalidStatus(sorted(unknown)[0], "unknown field")
    state = doc.get("state")
    if not isinstance(state, str) or state not in STATUS_STATES:
        raise InvalidStatus("state", f"must be one of {sorted(STATUS_STATES)}")
    grant_id = doc.get("grant_id")
    if not isinstance(grant_id, str) or not grant_id:
        raise InvalidStatus("grant_id", "must be a non-empty string")
    out = {"state": state, "grant_id": grant_id}
    if "reason" in doc and doc["reason"] is not None:
        reason = doc["reason"]
        # Reasons are machine codes, never free text: free text is how a
        # password or an SSID would leak into a log on the uploader side.
        if not isinstance(reason, str) or not REASON_CODE.fullmatch(reason):
            raise InvalidStatus("reason", "must match [a-z0-9_-]{1,64}")
        out["reason"] = reason
    return out


def status_plaintext(status: Mapping[str, Any]) -> bytes:
    """Compact JSON with sorted keys, so equal documents give equal bytes."""
    doc = _validate_status(status)
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("ascii")


def encrypt_status(k_down: bytes, counter: int, status: Mapping[str, Any]) -> bytes:
    """AES-256-GCM(K_down, counter nonce, status JSON, AAD) ciphertext+tag.

    The counter starts at 0 for each session and increases by one per
    message; it must never repeat under one K_down.
    """
    _check_key(k_down, "k_down")
    return AESGCM(k_down).encrypt(status_nonce(counter), status_plaintext(status), STATUS_AAD)


def decrypt_status(k_down: bytes, counter: int, message: bytes) -> dict[str, str]:
    _check_key(k_down, "k_down")
    if not TAG_LEN < len(message) <= MAX_STATUS_MESSAGE:
        raise DecryptionFailed("status")
    plaintext = _open(k_down, status_nonce(counter), message, STATUS_AAD, "status")
    try:
        doc = _loads_object(plaintext)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidStatus("plaintext", "not a JSON object") from exc
    return _validate_status(doc)
