"""The firmware library (`firmware/`, C on mbedTLS) as a device protocol engine.

`CEngine` presents the interface the BLE simulator uses from the Python
reference device (`device_id`, `capabilities`, `state`, `last_report`,
`device_info()`, `accept_grant()`, `receive_credentials()`,
`status_message()`, `status()`, `finish()`), but every decision and every
byte comes from the C library through ctypes. So `BlePeripheral(CEngine(...))`
is a simulated device whose protocol engine is the firmware's, and the real
BLE bridge uploads to it over bumble's virtual link.

Build the shared library with plain CMake (`cmake -S firmware -B build &&
cmake --build build`, giving `build/libprovisiond_device.so`) and pass its
path, or set `PROVISIOND_FIRMWARE_LIB`.

The library verifies ES256 and HS256 grants only (mbedTLS 2.x has no
Ed25519): the daemon must run with `[wifi] signing_algorithm = "ES256"`.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisiond.wifi.crypto import CAP_WIFI_UPLOAD, WifiCredentials, b64url_encode
from provisiond.wifi.jws import GrantRejected
from provisiond_sim.reference import CredentialRejected

__all__ = ["CEngine", "CGrant", "FirmwareLibrary", "load_library"]

PD_OK = 0
_STATES = {0: "idle", 1: "grant-accepted", 2: "connecting", 3: "connected", 4: "failed"}
_STATE_CODES = {name: code for code, name in _STATES.items()}
_MAX_STATUS = 192

_NowFn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)
_RandomFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t
)
_PersistFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class _Config(ctypes.Structure):
    # Mirrors pd_config_t; checked against pd_config_sizeof() at load.
    _fields_ = [
        ("device_id", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("private_key", ctypes.c_uint8 * 32),
        ("has_clock", ctypes.c_int),
        ("leeway", ctypes.c_int64),
        ("require_nonce", ctypes.c_int),
        ("now", _NowFn),
        ("random", _RandomFn),
        ("persist", _PersistFn),
        ("ctx", ctypes.c_void_p),
    ]


class _Credentials(ctypes.Structure):
    _fields_ = [
        ("ssid", ctypes.c_char * 33),
        ("ssid_len", ctypes.c_size_t),
        ("password", ctypes.c_char * 129),
        ("security", ctypes.c_char * 12),
    ]


class _Report(ctypes.Structure):
    _fields_ = [
        ("valid", ctypes.c_int),
        ("connected", ctypes.c_int),
        ("grant_id", ctypes.c_char * 24),
        ("reason", ctypes.c_char * 65),
    ]


class _GrantInfo(ctypes.Structure):
    _fields_ = [("jti", ctypes.c_char * 24), ("iat", ctypes.c_int64), ("exp", ctypes.c_int64)]


# pd_key_t: alg (enum), kid[41], p256[65], hs256[64], size_t hs256_len.
class _Key(ctypes.Structure):
    _fields_ = [
        ("alg", ctypes.c_int),
        ("kid", ctypes.c_char * 41),
        ("p256", ctypes.c_uint8 * 65),
        ("hs256", ctypes.c_uint8 * 64),
        ("hs256_len", ctypes.c_size_t),
    ]


class FirmwareLibrary:
    """The loaded shared library with its signatures declared."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path))
        dev_p, u8_p, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "pd_device_sizeof": (size_p, []),
            "pd_config_sizeof": (size_p, []),
            "pd_freshness_sizeof": (size_p, []),
            "pd_reason_str": (ctypes.c_char_p, [ctypes.c_int]),
            "pd_key_from_jwk": (ctypes.c_int, [ctypes.POINTER(_Key), ctypes.c_char_p, size_p]),
            "pd_device_init": (
                ctypes.c_int,
                [dev_p, ctypes.POINTER(_Config), ctypes.POINTER(_Key), ctypes.c_void_p],
            ),
            "pd_device_deinit": (None, [dev_p]),
            "pd_device_set_nonce": (None, [dev_p, ctypes.c_char_p]),
            "pd_device_info": (size_p, [dev_p, ctypes.c_char_p, size_p]),
            "pd_accept_grant": (
                ctypes.c_int,
                [dev_p, ctypes.c_char_p, size_p, ctypes.POINTER(_GrantInfo)],
            ),
            "pd_receive_credentials": (
                ctypes.c_int,
                [dev_p, ctypes.c_char_p, size_p, ctypes.POINTER(_Credentials)],
            ),
            "pd_status": (
                ctypes.c_int,
                [dev_p, ctypes.c_int, ctypes.c_char_p, u8_p, size_p, ctypes.POINTER(size_p)],
            ),
            "pd_finish": (
                ctypes.c_int,
                [dev_p, ctypes.c_int, ctypes.c_char_p, u8_p, size_p, ctypes.POINTER(size_p)],
            ),
            "pd_device_state": (ctypes.c_int, [dev_p]),
            "pd_device_nonce": (u8_p, [dev_p]),
            "pd_device_public_key": (u8_p, [dev_p]),
            "pd_device_last_report": (ctypes.POINTER(_Report), [dev_p]),
            "pd_device_freshness": (ctypes.c_void_p, [dev_p]),
            # GATT framing, for uploader-side checks against the Python profile.
            "pd_data_frame": (
                size_p,
                [ctypes.c_char_p, size_p, size_p, size_p, ctypes.c_char_p, size_p],
            ),
            "pd_commit_frame": (None, [ctypes.c_char_p, size_p, ctypes.c_char_p]),
            "pd_fragment_count": (size_p, [size_p, size_p]),
            "pd_fragment": (
                size_p,
                [ctypes.c_char_p, size_p, size_p, size_p, ctypes.c_char_p, size_p],
            ),
            "pd_plain_status": (
                size_p,
                [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, size_p],
            ),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        if lib.pd_config_sizeof() != ctypes.sizeof(_Config):
            raise RuntimeError(f"{self.path}: pd_config_t does not match this adapter")
        self.lib = lib
        self.device_size = int(lib.pd_device_sizeof())
        self.freshness_size = int(lib.pd_freshness_sizeof())

    def reason(self, code: int) -> str:
        return bytes(self.lib.pd_reason_str(code)).decode("ascii")


_LOADED: dict[Path, FirmwareLibrary] = {}


def load_library(path: str | Path | None = None) -> FirmwareLibrary:
    """Load (once per path) the firmware's shared library."""
    if path is None:
        env = os.environ.get("PROVISIOND_FIRMWARE_LIB")
        if not env:
            raise RuntimeError("pass the library path or set PROVISIOND_FIRMWARE_LIB")
        path = env
    key = Path(path).resolve()
    if key not in _LOADED:
        _LOADED[key] = FirmwareLibrary(key)
    return _LOADED[key]


@dataclass(frozen=True)
class CGrant:
    """What accept_grant returns: the grant's id and times."""

    jti: str
    iat: int
    exp: int


class CEngine:
    """A device protocol engine backed by the C firmware library."""

    def __init__(
        self,
        device_id: int,
        private_key: X25519PrivateKey | bytes,
        pinned_keys: Iterable[Mapping[str, Any]],
        *,
        library: FirmwareLibrary | str | Path | None = None,
        has_clock: bool = True,
        now: Callable[[], float] = time.time,
        capabilities: int = CAP_WIFI_UPLOAD,
        leeway: int = 30,
        require_nonce: bool = False,
        nonce: bytes | None = None,
        freshness: bytes | None = None,
    ) -> None:
        self._lib = library if isinstance(library, FirmwareLibrary) else load_library(library)
        lib = self._lib.lib
        self.device_id = device_id
        self.capabilities = capabilities
        self.has_clock = has_clock
        self.leeway = leeway
        self.require_nonce = require_nonce
        # Every state the library asked us to make durable, newest last.
        self.persisted: list[bytes] = []
        self._now = now

        raw = private_key if isinstance(private_key, bytes) else private_key.private_bytes_raw()
        # The callbacks must outlive the device: keep them on self.
        self._now_cb = _NowFn(lambda _ctx: int(self._now()))
        self._random_cb = _RandomFn(self._random)
        self._persist_cb = _PersistFn(self._persist)
        cfg = _Config(
            device_id=device_id,
            capabilities=capabilities,
            has_clock=int(has_clock),
            leeway=leeway,
            require_nonce=int(require_nonce),
            now=self._now_cb,
            random=self._random_cb,
            persist=self._persist_cb,
            ctx=None,
        )
        ctypes.memmove(cfg.private_key, raw, 32)

        # The activation reply may list several keys; pin the first the
        # library can verify (EdDSA keys are refused by it).
        key = _Key()
        last = None
        for jwk in pinned_keys:
            text = json.dumps(dict(jwk)).encode()
            last = lib.pd_key_from_jwk(ctypes.byref(key), text, len(text))
            if last == PD_OK:
                break
        if last != PD_OK:
            reason = "no key" if last is None else self._lib.reason(last)
            raise ValueError(f"no pinned key the firmware library can use ({reason})")

        self._dev = ctypes.create_string_buffer(self._lib.device_size)
        restored = None
        if freshness is not None:
            restored = ctypes.create_string_buffer(freshness, len(freshness))
        rc = lib.pd_device_init(self._dev, ctypes.byref(cfg), ctypes.byref(key), restored)
        ctypes.memset(ctypes.byref(cfg), 0, ctypes.sizeof(cfg))
        ctypes.memset(ctypes.byref(key), 0, ctypes.sizeof(key))
        if rc != PD_OK:
            raise ValueError(f"pd_device_init: {self._lib.reason(rc)}")
        if nonce is not None:
            lib.pd_device_set_nonce(self._dev, nonce)

    # ---- callbacks from C

    @staticmethod
    def _random(_ctx: int | None, buf: Any, length: int) -> int:
        ctypes.memmove(buf, os.urandom(length), length)
        return 0

    def _persist(self, _ctx: int | None, state: int | None) -> int:
        if state is None:
            return -1
        self.persisted.append(ctypes.string_at(state, self._lib.freshness_size))
        return 0

    # ---- the ReferenceDevice interface

    @property
    def state(self) -> str:
        return _STATES[self._lib.lib.pd_device_state(self._dev)]

    @property
    def nonce(self) -> bytes:
        return ctypes.string_at(self._lib.lib.pd_device_nonce(self._dev), 16)

    @property
    def public_key(self) -> bytes:
        return ctypes.string_at(self._lib.lib.pd_device_public_key(self._dev), 32)

    @property
    def freshness(self) -> bytes:
        """pd_freshness_t as the firmware would write it to flash."""
        ptr = self._lib.lib.pd_device_freshness(self._dev)
        return ctypes.string_at(ptr, self._lib.freshness_size)

    @property
    def last_iat(self) -> int | None:
        # pd_freshness_t starts with int64 last_iat, then uint8 has_last_iat.
        raw = self.freshness
        return int.from_bytes(raw[:8], sys.byteorder, signed=True) if raw[8] else None

    @property
    def last_report(self) -> dict[str, str | None] | None:
        report = self._lib.lib.pd_device_last_report(self._dev).contents
        if not report.valid:
            return None
        return {
            "grant_id": report.grant_id.decode("ascii"),
            "state": "connected" if report.connected else "failed",
            "reason": None if report.connected else report.reason.decode("ascii"),
        }

    def device_info(self) -> dict[str, Any]:
        out = ctypes.create_string_buffer(256)
        n = self._lib.lib.pd_device_info(self._dev, out, len(out))
        info: dict[str, Any] = json.loads(out.raw[:n])
        # The library's own bytes, checked against what it holds.
        assert info["public_key"] == b64url_encode(self.public_key)
        return info

    def accept_grant(self, blob: str) -> CGrant:
        data = blob.encode("utf-8")
        info = _GrantInfo()
        rc = self._lib.lib.pd_accept_grant(self._dev, data, len(data), ctypes.byref(info))
        if rc != PD_OK:
            raise GrantRejected(self._lib.reason(rc))
        return CGrant(jti=info.jti.decode("ascii"), iat=info.iat, exp=info.exp)

    def receive_credentials(self, message: bytes) -> WifiCredentials:
        creds = _Credentials()
        try:
            rc = self._lib.lib.pd_receive_credentials(
                self._dev, bytes(message), len(message), ctypes.byref(creds)
            )
            if rc != PD_OK:
                raise CredentialRejected(self._lib.reason(rc))
            return WifiCredentials(
                ssid=creds.ssid[: creds.ssid_len].decode("utf-8"),
                password=creds.password.decode("utf-8"),
                security=creds.security.decode("ascii"),
            )
        finally:
            ctypes.memset(ctypes.byref(creds), 0, ctypes.sizeof(creds))

    def status(self, state: str, reason: str | None = None) -> bytes:
        return self._sealed(
            self._lib.lib.pd_status, _STATE_CODES[state], reason, error=CredentialRejected
        )

    def status_message(self, reason: str | None = None) -> bytes:
        return self.status(self.state, reason)

    def finish(self, connected: bool, reason: str | None = None) -> bytes:
        return self._sealed(
            self._lib.lib.pd_finish, int(connected), reason, error=CredentialRejected
        )

    def _sealed(self, fn: Any, arg: int, reason: str | None, *, error: type[Exception]) -> bytes:
        out = (ctypes.c_uint8 * _MAX_STATUS)()
        n = ctypes.c_size_t()
        rc = fn(
            self._dev,
            arg,
            None if reason is None else reason.encode("ascii"),
            out,
            len(out),
            ctypes.byref(n),
        )
        if rc != PD_OK:
            raise error(self._lib.reason(rc))
        return bytes(out[: n.value])

    def close(self) -> None:
        """Wipe the device's keys and session (the C struct)."""
        self._lib.lib.pd_device_deinit(self._dev)

    def __del__(self) -> None:
        dev = getattr(self, "_dev", None)
        if dev is not None:
            ctypes.memset(dev, 0, len(dev))
