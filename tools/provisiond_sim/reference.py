"""Reference implementation of both ends of a WiFi credential upload (docs/wifi-crypto.md).

This module is written to be read by firmware authors. `ReferenceDevice` is
what a device must do with a grant and a credential message; the other end
is `provisiond.wifi.uploader.Uploader`. Both sit on the same primitives in
`provisiond.wifi.crypto`, and docs/wifi-crypto.md plus
tests/vectors/wifi-grant-v1.json pin every byte.

Grant verification is spelled out by hand with plain signature primitives
rather than a JWT library, on purpose: a device has no JWT library, and the
classic JWT failures (`alg: none`, HS256 keyed with a public key) come from
letting the token choose how it is verified. Here the token chooses nothing:
the pinned key decides the algorithm, and the header must agree with it.

Firmware must keep `last_iat` and the jti ledger in non-volatile storage;
otherwise a reboot reopens the replay window for a device without a clock.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.wifi.crypto import (
    CAP_WIFI_UPLOAD,
    GRANT_AUDIENCE,
    MAX_GRANT_LIFETIME,
    DecryptionFailed,
    InvalidCredentials,
    InvalidPeerKey,
    SessionKeys,
    WifiCredentials,
    b64url_decode,
    b64url_encode,
    decrypt_credentials,
    derive_session_key,
    encrypt_status,
    x25519_shared,
)
from provisiond.wifi.jws import GrantRejected, Jws, split_jws

# Clock skew tolerated between gateway and device, in seconds.
DEFAULT_LEEWAY: Final = 30
# Bound on remembered jtis. Safe to evict: an evicted grant's iat is <= the
# last accepted iat, so the monotonic-iat rule still refuses it.
MAX_LEDGER: Final = 32
# The `dn` a device shows in Device Info and wants bound into its next grant.
DEVICE_NONCE_LEN: Final = 16

_ALG_BY_KTY: Final = {"OKP": "EdDSA", "EC": "ES256", "oct": "HS256"}


class CredentialRejected(Exception):
    """The device refused a credential message: no_grant, already_used,
    expired, decrypt_failed or bad_credentials."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"credential message rejected: {reason}")
        self.reason = reason


# --------------------------------------------------------------------------- grant claims


@dataclass(frozen=True)
class GrantClaims:
    iss: str
    sub: str
    aud: str
    iat: int
    exp: int
    jti: str
    cap: int
    epk: bytes
    dn: bytes | None
    kid: str
    alg: str


# --------------------------------------------------------------------------- pinned keys


@dataclass(frozen=True)
class PinnedKey:
    kid: str
    alg: str
    key: Ed25519PublicKey | ec.EllipticCurvePublicKey | bytes = field(repr=False)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> PinnedKey:
        """Import a key from the activation reply, fixing its algorithm for good.

        The algorithm follows from the key type; a JWK `alg` that disagrees is
        an error here, at pinning time, not something to sort out per token.
        """
        kty, kid = jwk.get("kty"), jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError("pinned key needs a kid")
        alg = _ALG_BY_KTY.get(str(kty))
        if alg is None or jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig":
            raise ValueError(
                f"unsupported or inconsistent key {kid}: kty={kty} alg={jwk.get('alg')}"
            )
        key: Ed25519PublicKey | ec.EllipticCurvePublicKey | bytes
        if kty == "OKP":
            if jwk.get("crv") != "Ed25519":
                raise ValueError("OKP keys must be Ed25519")
            key = Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
        elif kty == "EC":
            x, y = b64url_decode(jwk["x"]), b64url_decode(jwk["y"])
            if jwk.get("crv") != "P-256" or len(x) != 32 or len(y) != 32:
                raise ValueError("EC keys must be P-256")
            # public_key() checks the point is on the curve (invalid-curve attacks).
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        else:
            key = b64url_decode(jwk["k"])
            if len(key) < 32:
                raise ValueError("HS256 keys must be at least 32 bytes")
        return cls(kid=kid, alg=alg, key=key)

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        """Check a JWS signature with this key's one algorithm."""
        try:
            if isinstance(self.key, Ed25519PublicKey):
                self.key.verify(signature, signing_input)
            elif isinstance(self.key, ec.EllipticCurvePublicKey):
                # JWS carries ECDSA as fixed-size r||s, not DER (RFC 7518 §3.4).
                if len(signature) != 64:
                    return False
                der = encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                )
                self.key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
            else:
                expected = hmac.new(self.key, signing_input, hashlib.sha256).digest()
                # Constant time, so the tag cannot be guessed byte by byte.
                return hmac.compare_digest(expected, signature)
        except InvalidSignature:
            return False
        return True


# --------------------------------------------------------------------------- device


@dataclass
class _Session:
    """What one accepted grant buys: keys, and the right to one credential message."""

    jti: str
    exp: int
    keys: SessionKeys = field(repr=False)
    counter: int = 0
    credentials_used: bool = False
    failure: str | None = None


class ReferenceDevice:
    """A device's side of the WiFi upload: grant checks, session, status.

    States: idle -> grant-accepted -> connecting -> (finish) -> idle.
    A failed attempt returns to idle too: the device is ready for a fresh
    grant without a reset.
    """

    def __init__(
        self,
        device_id: int,
        private_key: X25519PrivateKey,
        pinned_keys: Iterable[Mapping[str, Any]],
        *,
        allowed_algorithms: Sequence[str] | None = None,
        has_clock: bool = True,
        now: Callable[[], float] = time.time,
        capabilities: int = CAP_WIFI_UPLOAD,
        leeway: int = DEFAULT_LEEWAY,
        require_nonce: bool = False,
        nonce: bytes | None = None,
    ) -> None:
        self.device_id = device_id
        self.capabilities = capabilities
        self.has_clock = has_clock
        self.leeway = leeway
        # A device without a clock should set this: a fresh dn is then the
        # only thing that proves a grant was made for this very session.
        self.require_nonce = require_nonce
        self._private = private_key
        self._now = now
        self._keys = {k.kid: k for k in (PinnedKey.from_jwk(j) for j in pinned_keys)}
        if not self._keys:
            raise ValueError("at least one pinned key is required")
        pinned_algs = {k.alg for k in self._keys.values()}
        if allowed_algorithms is None:
            # Normally one pinned key, hence exactly one algorithm.
            if len(pinned_algs) != 1:
                raise ValueError("pinned keys use several algorithms; pass allowed_algorithms")
            allowed_algorithms = sorted(pinned_algs)
        if "none" in allowed_algorithms or not set(allowed_algorithms) <= pinned_algs:
            raise ValueError("allowed_algorithms must name algorithms of pinned keys only")
        self.allowed_algorithms = frozenset(allowed_algorithms)

        self.state = "idle"
        self.last_iat: int | None = None  # persist in flash on real hardware
        self._ledger: dict[str, int] = {}  # jti -> exp; persist too
        self._session: _Session | None = None
        # `nonce` is injectable only so test vectors can pin it; real devices
        # draw a fresh one at boot.
        self._nonce = nonce if nonce is not None else os.urandom(DEVICE_NONCE_LEN)
        # The plaintext result for P/devices/N/wifi/status (docs/protocol.md §1).
        self.last_report: dict[str, str | None] | None = None

    # ---- identity

    @property
    def public_key(self) -> bytes:
        return self._private.public_key().public_bytes_raw()

    @property
    def nonce(self) -> bytes:
        return self._nonce

    def device_info(self) -> dict[str, Any]:
        """What the Device Info characteristic exposes (all public)."""
        return {
            "device_id": self.device_id,
            "capabilities": self.capabilities,
            "public_key": b64url_encode(self.public_key),
            "nonce": b64url_encode(self._nonce),
        }

    def _renew_nonce(self) -> None:
        # A new nonce invalidates every grant minted for the old one, so a
        # grant requested for one session cannot be kept for a later one.
        self._nonce = os.urandom(DEVICE_NONCE_LEN)

    # ---- grant

    def accept_grant(self, blob: str) -> GrantClaims:
        """Verify a grant and open a session, or raise GrantRejected.

        Checks run signature first: nothing in an unauthenticated token is
        allowed to influence anything beyond picking the pinned key.
        """
        if self.state == "connecting":
            raise GrantRejected("busy", "an attempt is in progress")
        jws = split_jws(blob)

        # 1. Algorithm and key come from what we pinned, never from the token.
        alg, kid = jws.header.get("alg"), jws.header.get("kid")
        if not isinstance(alg, str) or alg not in self.allowed_algorithms:
            raise GrantRejected("alg_not_allowed", repr(alg))
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise GrantRejected("unknown_kid", repr(kid))
        if key.alg != alg:
            # e.g. HS256 naming an Ed25519 kid: the algorithm-confusion attack.
            raise GrantRejected("alg_not_allowed", f"{alg} with a {key.alg} key")
        if "crit" in jws.header:
            # RFC 7515 §4.1.11: extensions we do not implement must be refused.
            raise GrantRejected("malformed", "crit header")
        if not key.verify(jws.signing_input, jws.signature):
            raise GrantRejected("bad_signature")

        # 2. Claims: signed, so now worth reading.
        claims = self._parse_claims(jws, kid=key.kid, alg=alg)
        if claims.aud != GRANT_AUDIENCE:
            raise GrantRejected("wrong_audience", claims.aud)
        if claims.sub != str(self.device_id):
            raise GrantRejected("wrong_subject", claims.sub)
        if not claims.cap & CAP_WIFI_UPLOAD:
            raise GrantRejected("missing_cap")
        if not 0 < claims.exp - claims.iat <= MAX_GRANT_LIFETIME:
            raise GrantRejected("malformed", "lifetime out of range")

        # 3. Time, only if we have a trustworthy clock.
        if self.has_clock:
            now = self._now()
            if now >= claims.exp + self.leeway:
                raise GrantRejected("expired")
            nbf = jws.claims.get("nbf", 0)
            if not isinstance(nbf, int) or isinstance(nbf, bool):
                raise GrantRejected("malformed", "claim nbf")
            if nbf > now + self.leeway:
                raise GrantRejected("not_yet_valid", "nbf")
            if claims.iat > now + self.leeway:
                raise GrantRejected("not_yet_valid", "iat")

        # 4. Single use. The ledger names the replay precisely; monotonic iat
        # is what actually holds on a clockless device.
        self._prune_ledger()
        if claims.jti in self._ledger:
            raise GrantRejected("replayed")
        if self.last_iat is not None and claims.iat <= self.last_iat:
            raise GrantRejected("stale_iat")
        if claims.dn is not None:
            if not hmac.compare_digest(claims.dn, self._nonce):
                raise GrantRejected("wrong_nonce")
        elif self.require_nonce:
            raise GrantRejected("wrong_nonce", "dn missing")

        # 5. Session key. Z from our static key and the grant's epk; the blob
        # itself salts HKDF so these keys belong to this grant alone.
        try:
            z = x25519_shared(self._private, claims.epk)
        except InvalidPeerKey as exc:
            raise GrantRejected("malformed", "epk is a low-order point") from exc
        keys = derive_session_key(z, blob)

        # 6. Commit only now, so a rejected grant changes nothing. A pending
        # session whose credentials never came is simply superseded.
        self._ledger[claims.jti] = claims.exp
        self._trim_ledger()
        self.last_iat = claims.iat
        self._session = _Session(jti=claims.jti, exp=claims.exp, keys=keys)
        self.state = "grant-accepted"
        self._renew_nonce()
        return claims

    @staticmethod
    def _parse_claims(jws: Jws, *, kid: str, alg: str) -> GrantClaims:
        c = jws.claims

        def need(name: str, typ: type) -> Any:
            value = c.get(name)
            # bool is an int in Python (and not a number in JSON terms).
            if not isinstance(value, typ) or isinstance(value, bool):
                raise GrantRejected("malformed", f"claim {name}")
            return value

        cap = c.get("cap")
        if not isinstance(cap, int) or isinstance(cap, bool):
            raise GrantRejected("missing_cap")
        aud = c.get("aud")
        if not isinstance(aud, str):
            # v1 grants carry one audience string; an array is not ours.
            raise GrantRejected("wrong_audience", repr(aud))
        try:
            epk = b64url_decode(need("epk", str))
            jti_raw = b64url_decode(need("jti", str))
            dn_text = c.get("dn")
            dn = None if dn_text is None else b64url_decode(need("dn", str))
        except ValueError as exc:
            raise GrantRejected("malformed", str(exc)) from exc
        if len(epk) != 32 or len(jti_raw) != 16:
            raise GrantRejected("malformed", "epk or jti length")
        return GrantClaims(
            iss=need("iss", str),
            sub=need("sub", str),
            aud=aud,
            iat=need("iat", int),
            exp=need("exp", int),
            jti=c["jti"],
            cap=cap,
            epk=epk,
            dn=dn,
            kid=kid,
            alg=alg,
        )

    def _prune_ledger(self) -> None:
        # Without a clock, "expired" means older than the newest grant we
        # accepted: such a jti is refused by the iat rule anyway.
        horizon = self._now() if self.has_clock else (self.last_iat or 0)
        self._ledger = {j: e for j, e in self._ledger.items() if e > horizon}

    def _trim_ledger(self) -> None:
        while len(self._ledger) > MAX_LEDGER:
            del self._ledger[min(self._ledger, key=self._ledger.__getitem__)]

    # ---- credentials and status

    def receive_credentials(self, message: bytes) -> WifiCredentials:
        """Decrypt the one credential message this grant allows."""
        session = self._session
        if session is None:
            raise CredentialRejected("no_grant")
        if session.credentials_used:
            raise CredentialRejected("already_used")
        # Spent before decrypting: a grant buys one attempt, good or bad.
        session.credentials_used = True
        if self.has_clock and self._now() >= session.exp + self.leeway:
            return self._fail_credentials(session, "expired")
        try:
            creds = decrypt_credentials(session.keys.k_up, message)
        except DecryptionFailed:
            return self._fail_credentials(session, "decrypt_failed")
        except InvalidCredentials:
            return self._fail_credentials(session, "bad_credentials")
        self.state = "connecting"
        return creds

    def _fail_credentials(self, session: _Session, reason: str) -> WifiCredentials:
        # Stay in the session so finish() can still tell the uploader why.
        session.failure = reason
        self.state = "failed"
        raise CredentialRejected(reason)

    def status(self, state: str, reason: str | None = None) -> bytes:
        """Encrypt one status notification under K_down with the next counter."""
        session = self._session
        if session is None:
            raise CredentialRejected("no_grant")
        doc: dict[str, str] = {"state": state, "grant_id": session.jti}
        if reason is not None:
            doc["reason"] = reason
        message = encrypt_status(session.keys.k_down, session.counter, doc)
        # The counter is the nonce: it must move on after every message.
        session.counter += 1
        return message

    def status_message(self, reason: str | None = None) -> bytes:
        """Notify the current state (e.g. "grant-accepted", "connecting")."""
        return self.status(self.state, reason)

    def finish(self, connected: bool, reason: str | None = None) -> bytes:
        """End the attempt: final encrypted status, then back to idle.

        `reason` is a machine code such as "wrong_password" or
        "ssid_not_found"; never free text that could carry the SSID or key.
        """
        session = self._session
        if session is None:
            raise CredentialRejected("no_grant")
        state = "connected" if connected else "failed"
        if not connected and reason is None:
            # No credentials ever came (uploader gone, timeout): say so.
            reason = session.failure or (
                "unknown" if session.credentials_used else "no_credentials"
            )
        message = self.status(state, None if connected else reason)
        self.last_report = {
            "grant_id": session.jti,
            "state": state,
            "reason": None if connected else reason,
        }
        self._session = None
        self.state = "idle"
        self._renew_nonce()
        return message
