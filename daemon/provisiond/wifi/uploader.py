"""The uploader's side of a WiFi credential upload (docs/wifi-crypto.md).

What a phone app, or the gateway's BLE bridge, does with a grant: derive the
session keys, encrypt the credentials once, read the device's sealed status
messages in order. docs/wifi-crypto.md and tests/vectors/ pin every byte;
the device's side is the reference device in the simulator package
(`provisiond_sim.reference`).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.wifi.crypto import (
    SessionKeys,
    b64url_decode,
    decrypt_status,
    derive_session_key,
    encrypt_credentials,
    x25519_shared,
)
from provisiond.wifi.jws import GrantRejected, parse_unverified


class UploaderError(Exception):
    """Misuse or a protocol mismatch on the uploader side; `reason` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class Uploader:
    """The app's (or BLE bridge's) side: one grant, one credential message."""

    def __init__(self, grant_blob: str, keys: SessionKeys, *, grant_id: str | None = None) -> None:
        self.grant_blob = grant_blob
        self.grant_id = (
            str(parse_unverified(grant_blob).get("jti")) if grant_id is None else grant_id
        )
        self._keys = keys
        self._sent = False
        self._counter = 0

    @classmethod
    def for_grant(
        cls,
        grant_blob: str,
        *,
        ephemeral_private: X25519PrivateKey | None = None,
        session_key: bytes | None = None,
        device_public_key: bytes | None = None,
        grant_id: str | None = None,
        epk: bytes | None = None,
    ) -> Uploader:
        """End-to-end/bridge mode: pass `ephemeral_private` (the `e` whose
        public half was sent as app_public_key) and `device_public_key`.
        Server-generated mode: pass the 64-byte `session_key` from the reply.

        `grant_id` and `epk` are the grant's `jti` and `epk` claims, for a
        caller that issued the grant and knows them; the others leave them
        out and they are read from the blob.
        """
        if (ephemeral_private is None) == (session_key is None):
            raise UploaderError("usage", "pass exactly one of ephemeral_private, session_key")
        if session_key is not None:
            return cls(grant_blob, SessionKeys.from_raw(session_key), grant_id=grant_id)
        assert ephemeral_private is not None
        if device_public_key is None:
            raise UploaderError("usage", "device_public_key is required with ephemeral_private")
        if epk is None or grant_id is None:
            try:
                claims = parse_unverified(grant_blob)
                epk = b64url_decode(str(claims.get("epk"))) if epk is None else epk
            except (ValueError, GrantRejected) as exc:
                raise UploaderError("malformed", "grant has no usable epk") from exc
            grant_id = str(claims.get("jti")) if grant_id is None else grant_id
        # Catches the easy mistake of pairing a grant with the wrong e; the
        # device would only say "decrypt_failed", far from the cause.
        if epk != ephemeral_private.public_key().public_bytes_raw():
            raise UploaderError("epk_mismatch", "grant was not issued for this ephemeral key")
        z = x25519_shared(ephemeral_private, device_public_key)
        return cls(grant_blob, derive_session_key(z, grant_blob), grant_id=grant_id)

    @property
    def session_keys(self) -> SessionKeys:
        return self._keys

    def credential_message(
        self, ssid: str, password: str, security: str = "wpa2-psk", *, nonce: bytes | None = None
    ) -> bytes:
        """Encrypt the credentials, once. A retry needs a fresh grant, since
        the device will not accept a second message under this one."""
        if self._sent:
            raise UploaderError("already_used", "one credential message per grant")
        self._sent = True
        return encrypt_credentials(self._keys.k_up, ssid, password, security, nonce=nonce)

    def read_status(self, message: bytes) -> dict[str, str]:
        """Decrypt the next status notification; they must be read in order."""
        status = decrypt_status(self._keys.k_down, self._counter, message)
        self._counter += 1
        if status["grant_id"] != self.grant_id:
            raise UploaderError("wrong_grant", "status is for another grant")
        return status
