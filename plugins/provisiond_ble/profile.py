"""The provisiond WiFi GATT profile, as bytes: UUIDs, framing, advertising.

Pure Python with no BLE stack, so firmware authors can read it beside
docs/ble-gatt.md and both ends (the bridge and the simulated device) share
one definition. docs/ble-gatt.md is the normative description.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Final

from provisiond.wifi.crypto import MAX_CREDENTIAL_MESSAGE
from provisiond.wifi.jws import MAX_GRANT_LEN

# 128-bit UUIDs of our own (random base b7e1xxxx-3f2a-4c55-9d0e-6a1f5c2e8d40).
SERVICE_UUID: Final = "b7e10000-3f2a-4c55-9d0e-6a1f5c2e8d40"
DEVICE_INFO_UUID: Final = "b7e10001-3f2a-4c55-9d0e-6a1f5c2e8d40"
WIFI_GRANT_UUID: Final = "b7e10002-3f2a-4c55-9d0e-6a1f5c2e8d40"
WIFI_CREDENTIAL_UUID: Final = "b7e10003-3f2a-4c55-9d0e-6a1f5c2e8d40"
WIFI_STATUS_UUID: Final = "b7e10004-3f2a-4c55-9d0e-6a1f5c2e8d40"

# Write framing (first byte of every write to Grant / Credential).
OP_DATA: Final = 0x01  # 01 | offset u16 LE | bytes
OP_COMMIT: Final = 0x02  # 02 | total length u16 LE | SHA-256(value)[0:8]
OP_ABORT: Final = 0x03  # 03
DATA_HEADER: Final = 3
DIGEST_LEN: Final = 8
# A characteristic holds one whole protocol value, so the protocol's own caps apply.
MAX_GRANT_BYTES: Final = MAX_GRANT_LEN
MAX_CREDENTIAL_BYTES: Final = MAX_CREDENTIAL_MESSAGE

# ATT application error codes (0x80-0x9F) a device answers a bad write with.
ERR_BAD_OFFSET: Final = 0x80
ERR_TOO_LARGE: Final = 0x81
ERR_MALFORMED: Final = 0x82
ERR_DIGEST: Final = 0x83

# Status messages: first byte says how the rest is to be read.
STATUS_PLAIN: Final = 0x00  # compact JSON; only before a session key exists
STATUS_SEALED: Final = 0x01  # AES-256-GCM under K_down, counter nonce (wifi-crypto.md §4.2)
# Notification fragments: header bit 7 = more fragments follow, bits 0-6 = index mod 128.
FRAG_MORE: Final = 0x80

# Advertising: service data under SERVICE_UUID = version | deviceId u32 LE | flags.
ADV_VERSION: Final = 0x01
ADV_FLAG_WIFI_UPLOAD: Final = 0x01
ADV_FLAG_BUSY: Final = 0x02
_ADV = struct.Struct("<BIB")

DEFAULT_ATT_MTU: Final = 23
PREFERRED_ATT_MTU: Final = 517


class FramingError(Exception):
    """A write broke the framing rules; `att_error` is what the device answers."""

    def __init__(self, att_error: int, message: str) -> None:
        super().__init__(message)
        self.att_error = att_error


def digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()[:DIGEST_LEN]


def data_frames(value: bytes, mtu: int) -> list[bytes]:
    """Split `value` into DATA writes that each fit one ATT Write Request (MTU - 3)."""
    room = mtu - 3 - DATA_HEADER
    if room <= 0:
        raise ValueError("MTU too small")
    return [
        bytes([OP_DATA]) + struct.pack("<H", offset) + value[offset : offset + room]
        for offset in range(0, len(value), room)
    ]


def commit_frame(value: bytes) -> bytes:
    return bytes([OP_COMMIT]) + struct.pack("<H", len(value)) + digest(value)


class Reassembler:
    """Device side of one chunked characteristic: DATA..., then COMMIT."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, frame: bytes) -> bytes | None:
        """Take one write; returns the whole value on a valid COMMIT.

        Any framing error discards the partial value, so the uploader starts
        again from offset 0 rather than guessing what the device kept.
        """
        if not frame:
            self._buffer.clear()
            raise FramingError(ERR_MALFORMED, "empty write")
        op = frame[0]
        if op == OP_ABORT:
            self._buffer.clear()
            return None
        if op == OP_DATA:
            if len(frame) < DATA_HEADER:
                self._buffer.clear()
                raise FramingError(ERR_MALFORMED, "short data frame")
            (offset,) = struct.unpack_from("<H", frame, 1)
            if offset != len(self._buffer):
                self._buffer.clear()
                raise FramingError(ERR_BAD_OFFSET, f"offset {offset}, expected {len(self._buffer)}")
            if offset + len(frame) - DATA_HEADER > self.limit:
                self._buffer.clear()
                raise FramingError(ERR_TOO_LARGE, "value too large")
            self._buffer += frame[DATA_HEADER:]
            return None
        if op == OP_COMMIT:
            value, self._buffer = bytes(self._buffer), bytearray()
            if len(frame) != 3 + DIGEST_LEN:
                raise FramingError(ERR_MALFORMED, "bad commit frame")
            (total,) = struct.unpack_from("<H", frame, 1)
            if total != len(value) or frame[3:] != digest(value):
                raise FramingError(ERR_DIGEST, "length or digest mismatch")
            return value
        self._buffer.clear()
        raise FramingError(ERR_MALFORMED, f"unknown opcode {op:#04x}")


def status_fragments(message: bytes, mtu: int) -> list[bytes]:
    """Split one status message into notifications of at most MTU - 3 bytes.

    A notification longer than MTU - 3 is silently truncated by the stack,
    so even a short message carries the one-byte fragment header.
    """
    room = mtu - 3 - 1
    if room <= 0:
        raise ValueError("MTU too small")
    chunks = [message[i : i + room] for i in range(0, len(message), room)] or [b""]
    return [
        bytes([(FRAG_MORE if i < len(chunks) - 1 else 0) | (i & 0x7F)]) + chunk
        for i, chunk in enumerate(chunks)
    ]


class StatusAssembler:
    """Uploader side: fragments in, whole status messages out."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._parts: list[bytes] = []

    def feed(self, fragment: bytes) -> bytes | None:
        if not fragment:
            return None
        header = fragment[0]
        if (header & 0x7F) != len(self._parts) & 0x7F:
            # A lost fragment: drop the partial message; the timeout covers the rest.
            self._parts = []
            if header & 0x7F:
                return None
        self._parts.append(fragment[1:])
        if sum(len(p) for p in self._parts) > self.limit:
            self._parts = []
            return None
        if header & FRAG_MORE:
            return None
        message, self._parts = b"".join(self._parts), []
        return message


def plain_status(state: str, reason: str | None = None, stage: str | None = None) -> bytes:
    doc: dict[str, str] = {"state": state}
    if reason is not None:
        doc["reason"] = reason
    if stage is not None:
        doc["stage"] = stage
    return bytes([STATUS_PLAIN]) + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sealed_status(message: bytes) -> bytes:
    return bytes([STATUS_SEALED]) + message


@dataclass(frozen=True)
class AdvertisedDevice:
    device_id: int
    flags: int

    @property
    def busy(self) -> bool:
        return bool(self.flags & ADV_FLAG_BUSY)


def adv_service_data(device_id: int, flags: int) -> bytes:
    return _ADV.pack(ADV_VERSION, device_id, flags)


def parse_adv_service_data(data: bytes) -> AdvertisedDevice | None:
    """Our service data, or None for another version or a foreign payload."""
    if len(data) < _ADV.size or data[0] != ADV_VERSION:
        return None
    _version, device_id, flags = _ADV.unpack_from(data)
    return AdvertisedDevice(device_id, flags)


def device_info_bytes(info: dict[str, Any]) -> bytes:
    return json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
