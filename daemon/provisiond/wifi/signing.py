"""Gateway side of WiFi grants: the signing key ring and grant issue (docs/wifi-crypto.md).

All functions are synchronous and CPU-bound (key generation, signing,
X25519); the daemon calls them from a worker thread. `KeyRing` guards its own
state with a lock so a rotation can run while grants are issued.

Bridge mode has no code path of its own: the BLE bridge generates its
ephemeral X25519 key in-process and passes the public half as
`app_public_key`, exactly like an end-to-end app. The daemon's signing code
therefore never holds the bridge's private key either.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.wifi.crypto import (
    CAP_WIFI_UPLOAD,
    GRANT_AUDIENCE,
    MAX_GRANT_LIFETIME,
    X25519_KEY_LEN,
    InvalidPeerKey,
    b64url_encode,
    derive_session_key,
    hs256_device_key,
    x25519_shared,
)

MIN_GRANT_LIFETIME: Final = 60
ASYMMETRIC_ALGS: Final = frozenset({"EdDSA", "ES256"})
INDEX_NAME: Final = "keys.json"
LOCK_NAME: Final = ".keys.lock"

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class GrantIssueError(Exception):
    """Base of errors that refuse to issue a grant."""


class DeviceNotWifiCapable(GrantIssueError):
    """The device lacks capability 0x02; the RPC layer answers 400."""

    code = "device_not_wifi_capable"

    def __init__(self, device_id: int) -> None:
        super().__init__(f"device {device_id} does not have the WiFi Upload capability")
        self.device_id = device_id


class InvalidGrantRequest(GrantIssueError, ValueError):
    """A request field is unusable; `field` uses the RPC body's field name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class AlgorithmUnavailable(GrantIssueError):
    """The requested signing algorithm has no key (or no HS256 master secret)."""

    def __init__(self, algorithm: str) -> None:
        super().__init__(f"no signing key for algorithm {algorithm!r}")
        self.algorithm = algorithm


class KeyRingError(Exception):
    """Base of key-ring storage problems; `path` names the file involved."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class InsecureKeyFile(KeyRingError):
    """A private key file is readable by group or others."""

    def __init__(self, path: Path, mode: int) -> None:
        super().__init__(path, f"mode {mode:04o} is too open, expected 0600")
        self.mode = mode


class KeyRingCorrupt(KeyRingError):
    """The index and the key files disagree, or a file cannot be parsed."""


class KeyRingReadOnly(KeyRingError):
    """Keys loaded from operator-supplied files cannot be rotated by the daemon."""


# --------------------------------------------------------------------------- keys


def _raw_public(key: PrivateKey) -> bytes:
    pub = key.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return pub.public_bytes_raw()


def _alg_for(key: PrivateKey) -> str:
    if isinstance(key, Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError(f"unsupported EC curve {key.curve.name}")


def compute_kid(key: PrivateKey) -> str:
    """First 16 hex chars of SHA-256(raw public key): stable across restarts
    and derivable by anyone holding the public key, so no registry is needed."""
    return hashlib.sha256(_raw_public(key)).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey = field(repr=False)
    created_at: float = 0.0
    retired_at: float | None = None
    # None means "verifies indefinitely" (the active key, or an operator file).
    verify_until: float | None = None

    @classmethod
    def from_private_key(cls, key: PrivateKey, *, created_at: float = 0.0) -> SigningKey:
        return cls(kid=compute_kid(key), alg=_alg_for(key), private_key=key, created_at=created_at)

    @classmethod
    def generate(cls, alg: str, *, now: float) -> SigningKey:
        key: PrivateKey
        if alg == "EdDSA":
            key = Ed25519PrivateKey.generate()
        elif alg == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise AlgorithmUnavailable(alg)
        return cls.from_private_key(key, created_at=now)

    def public_jwk(self) -> dict[str, Any]:
        """The verification key a device pins at activation."""
        jwk: dict[str, Any]
        if isinstance(self.private_key, Ed25519PrivateKey):
            jwk = {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": b64url_encode(_raw_public(self.private_key)),
            }
        else:
            nums = self.private_key.public_key().public_numbers()
            jwk = {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url_encode(nums.x.to_bytes(32, "big")),
                "y": b64url_encode(nums.y.to_bytes(32, "big")),
            }
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return jwk

    def verifies_at(self, now: float) -> bool:
        return self.verify_until is None or now < self.verify_until

    def pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def hs256_kid(device_id: int) -> str:
    return f"hs256-dev-{device_id}"


def hs256_device_jwk(master_secret: bytes, device_id: int) -> dict[str, Any]:
    """The `oct` JWK an HS256 device receives in its activation reply.

    It is a secret: it goes to that one device only, never into a published
    key list or a log.
    """
    return {
        "kty": "oct",
        "k": b64url_encode(hs256_device_key(master_secret, device_id)),
        "kid": hs256_kid(device_id),
        "alg": "HS256",
        "use": "sig",
    }


def _load_pem(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyRingCorrupt(path, f"cannot load private key: {exc}") from exc
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise KeyRingCorrupt(path, "only Ed25519 and P-256 keys can sign grants")


def _write_new_file(path: Path, data: bytes) -> None:
    # O_EXCL: never overwrite (or follow a planted symlink to) an existing
    # file; mode 0600 at creation so the key is never readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _ring_lock(directory: Path) -> Iterator[None]:
    """Held while a process reads and perhaps creates the ring in `directory`.

    Daemons of a group on SQLite may share one keys directory and start at
    the same moment: without it, each made a first key of its own and the
    last index written won, leaving the others signing with a key nobody
    publishes.
    """
    fd = os.open(directory / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SigningRing(Protocol):
    """What signs grants: a file ring (`KeyRing`) or the store's (`wifi.keystore.StoredRing`)."""

    @property
    def active(self) -> SigningKey: ...

    @property
    def keys(self) -> list[SigningKey]: ...

    def verification_jwks(self, now: float) -> list[dict[str, Any]]: ...


class KeyRing:
    """The gateway's grant-signing keys: one active, others verify-only.

    A ring made by `load_or_create` persists itself in its directory; one made
    by `load_files` belongs to the operator and refuses to rotate.
    """

    def __init__(self, keys: Iterable[SigningKey], *, directory: Path | None = None) -> None:
        self._keys = list(keys)
        self._directory = directory
        self._lock = threading.Lock()
        if sum(1 for k in self._keys if k.retired_at is None) != 1:
            raise ValueError("a key ring needs exactly one active key")

    # ---- construction

    @classmethod
    def load_or_create(cls, directory: Path, alg: str, *, now: float) -> KeyRing:
        """Open the ring in `directory`, generating the first key if it is empty.

        If the configured `alg` differs from the active key's, the ring
        rotates to a new key of that algorithm, keeping the old one for
        verification for one maximum grant lifetime.
        """
        if alg not in ASYMMETRIC_ALGS:
            raise AlgorithmUnavailable(alg)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _ring_lock(directory):
            if not (directory / INDEX_NAME).exists():
                key = SigningKey.generate(alg, now=now)
                _write_new_file(directory / f"{key.kid}.pem", key.pem())
                ring = cls([key], directory=directory)
                ring._save()
                return ring
            ring = cls(cls._read_index(directory), directory=directory)
            if ring.active.alg != alg:
                ring.rotate(now, alg=alg)
            else:
                ring.prune(now)
            return ring

    @classmethod
    def load_existing(cls, directory: Path) -> KeyRing | None:
        """The ring in `directory` as it is (nothing generated, rotated or pruned), if any."""
        if not (directory / INDEX_NAME).exists():
            return None
        return cls(cls._read_index(directory), directory=directory)

    @classmethod
    def _read_index(cls, directory: Path) -> list[SigningKey]:
        index = directory / INDEX_NAME
        try:
            doc = json.loads(index.read_text("utf-8"))
            entries = doc["keys"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyRingCorrupt(index, f"unreadable index: {exc}") from exc
        keys: list[SigningKey] = []
        for entry in entries:
            try:
                kid = str(entry["kid"])
                path = directory / f"{kid}.pem"
                created_at = float(entry["created_at"])
                retired_at = None if entry["retired_at"] is None else float(entry["retired_at"])
                verify_until = (
                    None if entry["verify_until"] is None else float(entry["verify_until"])
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise KeyRingCorrupt(index, f"bad entry {entry!r}") from exc
            mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0
            if mode & 0o077:
                raise InsecureKeyFile(path, mode)
            key = SigningKey.from_private_key(_load_pem(path), created_at=created_at)
            # The kid is a hash of the key itself: a mismatch means a file was
            # swapped or corrupted, and signing with it would confuse devices.
            if key.kid != kid or key.alg != entry.get("alg"):
                raise KeyRingCorrupt(path, "key does not match its index entry")
            keys.append(replace(key, retired_at=retired_at, verify_until=verify_until))
        return keys

    @classmethod
    def load_files(cls, paths: Sequence[Path]) -> KeyRing:
        """Keys supplied by the operator (e.g. systemd `LoadCredential=`).

        The first file signs; the rest only verify, until the operator
        removes them. Rotation is the operator's job, so `rotate` refuses.
        """
        if not paths:
            raise ValueError("at least one key file is required")
        keys = []
        for i, path in enumerate(paths):
            key = SigningKey.from_private_key(_load_pem(path))
            keys.append(key if i == 0 else replace(key, retired_at=0.0))
        return cls(keys, directory=None)

    # ---- queries

    @property
    def active(self) -> SigningKey:
        with self._lock:
            return next(k for k in self._keys if k.retired_at is None)

    @property
    def keys(self) -> list[SigningKey]:
        with self._lock:
            return list(self._keys)

    def get(self, kid: str) -> SigningKey | None:
        with self._lock:
            return next((k for k in self._keys if k.kid == kid), None)

    def verification_jwks(self, now: float) -> list[dict[str, Any]]:
        """Public keys that may still verify a grant at `now`, active first."""
        with self._lock:
            keys = sorted(self._keys, key=lambda k: k.retired_at is not None)
        return [k.public_jwk() for k in keys if k.verifies_at(now)]

    # ---- mutation

    def rotate(
        self, now: float, max_grant_lifetime: int = MAX_GRANT_LIFETIME, *, alg: str | None = None
    ) -> SigningKey:
        """Make a new active key; the old one verifies for one grant lifetime.

        Grants signed just before the rotation stay verifiable until they
        expire; after that the old key is dropped (and its file deleted).
        """
        if self._directory is None:
            raise KeyRingReadOnly(Path("<files>"), "keys loaded from files cannot be rotated")
        with self._lock:
            old = next(k for k in self._keys if k.retired_at is None)
            new = SigningKey.generate(alg or old.alg, now=now)
            _write_new_file(self._directory / f"{new.kid}.pem", new.pem())
            self._keys = [
                replace(k, retired_at=now, verify_until=now + max_grant_lifetime) if k is old else k
                for k in self._keys
            ]
            self._keys.append(new)
            removed = self._prune_locked(now)
            self._save_locked()
        self._delete_files(removed)
        return new

    def prune(self, now: float) -> list[str]:
        """Drop retired keys past `verify_until`; returns their kids."""
        with self._lock:
            removed = self._prune_locked(now)
            if removed and self._directory is not None:
                self._save_locked()
        self._delete_files(removed)
        return [k.kid for k in removed]

    def _prune_locked(self, now: float) -> list[SigningKey]:
        removed = [k for k in self._keys if not k.verifies_at(now)]
        self._keys = [k for k in self._keys if k.verifies_at(now)]
        return removed

    def _delete_files(self, removed: list[SigningKey]) -> None:
        # Deleted only after the index no longer names them, so a crash in
        # between leaves an orphan file rather than a dangling index entry.
        if self._directory is None:
            return
        for key in removed:
            (self._directory / f"{key.kid}.pem").unlink(missing_ok=True)

    def _save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        assert self._directory is not None
        doc = {
            "version": 1,
            "keys": [
                {
                    "kid": k.kid,
                    "alg": k.alg,
                    "created_at": k.created_at,
                    "retired_at": k.retired_at,
                    "verify_until": k.verify_until,
                }
                for k in self._keys
            ],
        }
        # Write-then-rename so a crash leaves either the old or the new index.
        # Named per process: another process sharing the directory may be
        # saving too, and must not rename this one's file from under it.
        tmp = self._directory / f".{INDEX_NAME}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        _write_new_file(tmp, json.dumps(doc, indent=2).encode("utf-8"))
        os.replace(tmp, self._directory / INDEX_NAME)
        _fsync_dir(self._directory)


# --------------------------------------------------------------------------- grants


@dataclass(frozen=True)
class IssuedGrant:
    grant_blob: str
    jti: str
    iat: int
    exp: int
    # The grant's `epk` claim: app_public_key, or the public half of the
    # gateway's ephemeral key in server-generated mode.
    epk: bytes
    # Only in server-generated mode; kept out of repr so it never reaches a log.
    session_key: bytes | None = field(repr=False)
    mode: Literal["e2e", "server"]
    kid: str = ""
    alg: str = ""


def sign_grant(claims: dict[str, Any], key: SigningKey) -> str:
    """JWS compact serialization of `claims` with `kid` in the header."""
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid})


def sign_grant_hs256(claims: dict[str, Any], master_secret: bytes, device_id: int) -> str:
    return jwt.encode(
        claims,
        hs256_device_key(master_secret, device_id),
        algorithm="HS256",
        headers={"kid": hs256_kid(device_id)},
    )


# A clamped X25519 scalar is a multiple of 8 (killing every small-order
# component) and, lying in [2^254, 2^255), never a multiple of the large prime
# order of the curve or its twist. So X25519(k, P) is all-zero exactly when P
# has small order, whatever k is: one probe key for the process tests as much
# as a fresh one per call, without a key generation on every grant.
_PROBE_KEY: Final = X25519PrivateKey.generate()


def check_x25519_public(public: bytes, field: str) -> None:
    """Refuse a public key that would make Z all-zero, before signing anything."""
    if len(public) != X25519_KEY_LEN:
        raise InvalidGrantRequest(field, "must be a 32-byte X25519 public key")
    try:
        x25519_shared(_PROBE_KEY, public)
    except InvalidPeerKey as exc:
        raise InvalidGrantRequest(field, "is a low-order X25519 point") from exc


def _check_grant_request(
    *,
    device_id: int,
    device_public_key: bytes,
    capabilities: int,
    expires_in: int,
    device_nonce: bytes | None,
) -> None:
    if not capabilities & CAP_WIFI_UPLOAD:
        raise DeviceNotWifiCapable(device_id)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int):
        raise InvalidGrantRequest("expires_in_seconds", "must be an integer")
    if not MIN_GRANT_LIFETIME <= expires_in <= MAX_GRANT_LIFETIME:
        raise InvalidGrantRequest(
            "expires_in_seconds", f"must be {MIN_GRANT_LIFETIME}..{MAX_GRANT_LIFETIME}"
        )
    if len(device_public_key) != X25519_KEY_LEN:
        raise InvalidGrantRequest("device_public_key", "must be a 32-byte X25519 public key")
    # No low-order probe for the device's key on every grant: activation
    # refused low-order keys before storing one, and in server-generated mode
    # x25519_shared refuses an all-zero Z anyway.
    if device_nonce is not None and not 8 <= len(device_nonce) <= 64:
        raise InvalidGrantRequest("device_nonce", "must be 8..64 bytes")


def _signing_key(
    keyring: SigningRing | None, algorithm: str | None, hs256_master_secret: bytes | None
) -> tuple[str, SigningKey | None]:
    """The algorithm that signs, and its key from the ring (None for HS256)."""
    # Asked once: a stored ring's active key changes with the clock.
    active = keyring.active if keyring is not None else None
    alg = algorithm or (active.alg if active is not None else "HS256")
    if alg == "HS256":
        if hs256_master_secret is None:
            raise AlgorithmUnavailable(alg)
        return alg, None
    if active is None or active.alg != alg:
        raise AlgorithmUnavailable(alg)
    return alg, active


def _sign_claims(
    claims: dict[str, Any],
    signing_key: SigningKey | None,
    hs256_master_secret: bytes | None,
    device_id: int,
) -> tuple[str, str]:
    """The grant blob and the `kid` its header names."""
    if signing_key is None:
        assert hs256_master_secret is not None
        return sign_grant_hs256(claims, hs256_master_secret, device_id), hs256_kid(device_id)
    return sign_grant(claims, signing_key), signing_key.kid


def issue_grant(
    keyring: SigningRing | None,
    *,
    gateway_id: str,
    device_id: int,
    device_public_key: bytes,
    capabilities: int,
    expires_in: int,
    now: float,
    app_public_key: bytes | None = None,
    device_nonce: bytes | None = None,
    hs256_master_secret: bytes | None = None,
    algorithm: str | None = None,
) -> IssuedGrant:
    """Sign a WiFi grant for one device.

    With `app_public_key` (end-to-end and bridge mode) it becomes `epk` and
    the gateway never learns K_session. Without it (server-generated mode)
    the gateway makes an ephemeral key, derives K_session, returns it and lets
    the ephemeral private key go out of scope; refusing this mode when it is
    configured off is the caller's decision.
    """
    _check_grant_request(
        device_id=device_id,
        device_public_key=device_public_key,
        capabilities=capabilities,
        expires_in=expires_in,
        device_nonce=device_nonce,
    )
    alg, signing_key = _signing_key(keyring, algorithm, hs256_master_secret)

    ephemeral: X25519PrivateKey | None = None
    if app_public_key is not None:
        check_x25519_public(app_public_key, "app_public_key")
        epk = app_public_key
    else:
        ephemeral = X25519PrivateKey.generate()
        epk = ephemeral.public_key().public_bytes_raw()

    iat = int(now)
    exp = iat + expires_in
    jti = b64url_encode(os.urandom(16))
    claims: dict[str, Any] = {
        "iss": gateway_id,
        "sub": str(device_id),
        "aud": GRANT_AUDIENCE,
        "iat": iat,
        "exp": exp,
        "jti": jti,
        "cap": CAP_WIFI_UPLOAD,
        "epk": b64url_encode(epk),
    }
    if device_nonce is not None:
        claims["dn"] = b64url_encode(device_nonce)

    blob, kid = _sign_claims(claims, signing_key, hs256_master_secret, device_id)

    session_key: bytes | None = None
    if ephemeral is not None:
        z = x25519_shared(ephemeral, device_public_key)
        session_key = derive_session_key(z, blob).raw
        # Python cannot wipe memory; dropping the only reference is the best
        # available "forget e", and nothing here ever serialises it.
        del ephemeral
    return IssuedGrant(
        grant_blob=blob,
        jti=jti,
        iat=iat,
        exp=exp,
        epk=epk,
        session_key=session_key,
        mode="e2e" if app_public_key is not None else "server",
        kid=kid,
        alg=alg,
    )
