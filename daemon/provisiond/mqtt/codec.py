"""MQTT 5 packet encoding and decoding: the subset a broker-side service needs.

CONNECT, PUBLISH (QoS 0/1), PUBACK, SUBSCRIBE, PINGREQ and DISCONNECT are
written; CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP and DISCONNECT are read.
QoS 2 is never requested (subscriptions ask for at most QoS 1): a QoS 2
PUBLISH a broker sends anyway is decoded so the client can refuse it with a
PUBREC (and a PUBREL with a PUBCOMP); PUBREC and PUBCOMP to us are errors.

Strings that arrive inside a PUBLISH are decoded leniently: the broker
forwards what another client sent, and one malformed message must not tear
the connection down (it would be redelivered after the reconnect, forever).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

# The boundary's own will, so a backend hands it down unchanged.
from provisiond.backends.types import Will

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x62
PUBCOMP = 0x70
SUBSCRIBE = 0x82
SUBACK = 0x90
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

MAX_REMAINING_LENGTH = 268_435_455
PINGREQ_PACKET = b"\xc0\x00"

# Property identifiers (MQTT 5, section 2.2.2.2) and their wire types.
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_AVAILABLE = 0x28
SHARED_AVAILABLE = 0x2A

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT,
    0x11: _U32, 0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip

_U16S = struct.Struct(">H")
_U32S = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent bytes that are not a packet this client can accept."""


@dataclass(slots=True)
class Message:
    """A received PUBLISH. `mid` is 0 for QoS 0."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None
    # Set once PUBACK is written: a packet id is reused after its ack, so a
    # second ack could acknowledge a different, unhandled message.
    acked: bool = False


@dataclass(slots=True)
class ConnAck:
    session_present: bool
    reason_code: int
    properties: dict[int, object]
    # False: a 2-byte CONNACK, which only MQTT 3.1.1 and older send (an MQTT 5
    # one always carries a property length); `reason_code` is then the old
    # return code (0-5), not an MQTT 5 reason code.
    mqtt5: bool = True


# --------------------------------------------------------------------- primitives


def varint(value: int) -> bytes:
    if value < 128:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """(value, next position), None if `buf` ends first; at most 4 bytes."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= end:
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ProtocolError("variable byte integer longer than 4 bytes")


def string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return _U16S.pack(len(raw)) + raw


def binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("binary field longer than 65535 bytes")
    return _U16S.pack(len(value)) + value


def _packet(first: int, body: bytes) -> bytes:
    if len(body) > MAX_REMAINING_LENGTH:
        raise ValueError("packet too large for MQTT")
    return bytes((first,)) + varint(len(body)) + body


def encode_properties(props: Sequence[tuple[int, object]]) -> bytes:
    out = bytearray()
    for ident, value in props:
        kind = _TYPES[ident]
        out.append(ident)
        if kind == _BYTE:
            out.append(int(value))  # type: ignore[call-overload]
        elif kind == _U16:
            out += _U16S.pack(value)
        elif kind == _U32:
            out += _U32S.pack(value)
        elif kind == _VARINT:
            out += varint(int(value))  # type: ignore[call-overload]
        elif kind == _STR:
            out += string(str(value))
        elif kind == _BIN:
            out += binary(bytes(value))  # type: ignore[call-overload]
        else:
            pair: tuple[str, str] = value  # type: ignore[assignment]
            out += string(pair[0]) + string(pair[1])
    return varint(len(out)) + bytes(out)


def decode_properties(buf: bytes, pos: int) -> tuple[dict[int, object], list[tuple[str, str]], int]:
    """Properties at `pos`: (single-valued ones by id, user properties, end position)."""
    found = read_varint(buf, pos, len(buf))
    if found is None:
        raise ProtocolError("truncated property length")
    length, pos = found
    end = pos + length
    if end > len(buf):
        raise ProtocolError("property length beyond the packet")
    props: dict[int, object] = {}
    users: list[tuple[str, str]] = []
    while pos < end:
        ident = buf[pos]
        pos += 1
        kind = _TYPES.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02x}")
        if kind == _BYTE:
            props[ident] = buf[pos]
            pos += 1
        elif kind == _U16:
            props[ident] = _U16S.unpack_from(buf, pos)[0]
            pos += 2
        elif kind == _U32:
            props[ident] = _U32S.unpack_from(buf, pos)[0]
            pos += 4
        elif kind == _VARINT:
            got = read_varint(buf, pos, end)
            if got is None:
                raise ProtocolError("truncated property")
            props[ident], pos = got
        elif kind == _BIN:
            size = _U16S.unpack_from(buf, pos)[0]
            props[ident] = buf[pos + 2 : pos + 2 + size]
            pos += 2 + size
        elif kind == _STR:
            size = _U16S.unpack_from(buf, pos)[0]
            props[ident] = buf[pos + 2 : pos + 2 + size].decode(errors="replace")
            pos += 2 + size
        else:
            size = _U16S.unpack_from(buf, pos)[0]
            key = buf[pos + 2 : pos + 2 + size].decode(errors="replace")
            pos += 2 + size
            size = _U16S.unpack_from(buf, pos)[0]
            users.append((key, buf[pos + 2 : pos + 2 + size].decode(errors="replace")))
            pos += 2 + size
    if pos != end:
        raise ProtocolError("property overruns its length")
    return props, users, end


# --------------------------------------------------------------------- packets out


def connect(
    *,
    client_id: str,
    clean_start: bool,
    keepalive: int,
    session_expiry: int,
    receive_maximum: int,
    maximum_packet_size: int = 0,
    will: Will | None = None,
    username: str | None = None,
    password: bytes | None = None,
) -> bytes:
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    props: list[tuple[int, object]] = [(SESSION_EXPIRY, session_expiry)]
    if receive_maximum < 65535:
        props.append((RECEIVE_MAXIMUM, receive_maximum))
    if maximum_packet_size:
        props.append((MAXIMUM_PACKET_SIZE, maximum_packet_size))
    body = bytearray(b"\x00\x04MQTT\x05")
    body.append(flags)
    body += _U16S.pack(keepalive)
    body += encode_properties(props)
    body += string(client_id)
    if will is not None:
        body += encode_properties(()) + string(will.topic) + binary(will.payload)
    if username is not None:
        body += string(username)
    if password is not None:
        body += binary(password)
    return _packet(CONNECT, bytes(body))


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    retain: bool = False,
    mid: int = 0,
    correlation_data: bytes | None = None,
    response_topic: str | None = None,
    user_properties: Sequence[tuple[str, str]] = (),
    message_expiry: int | None = None,
) -> bytes:
    props: list[tuple[int, object]] = []
    if message_expiry is not None:
        props.append((MESSAGE_EXPIRY, message_expiry))
    if response_topic is not None:
        props.append((RESPONSE_TOPIC, response_topic))
    if correlation_data is not None:
        props.append((CORRELATION_DATA, correlation_data))
    props.extend((USER_PROPERTY, pair) for pair in user_properties)
    head = string(topic)
    if qos:
        head += _U16S.pack(mid)
    first = PUBLISH | (qos << 1) | (1 if retain else 0)
    return _packet(first, head + (encode_properties(props) if props else b"\x00") + payload)


def puback(mid: int) -> bytes:
    return b"\x40\x02" + _U16S.pack(mid)


def subscribe(mid: int, filters: Sequence[tuple[str, int, int]]) -> bytes:
    """One SUBSCRIBE for every (filter, QoS, retain handling)."""
    body = bytearray(_U16S.pack(mid) + b"\x00")
    for topic, qos, retain_handling in filters:
        body += string(topic)
        body.append(qos | (retain_handling << 4))
    return _packet(SUBSCRIBE, bytes(body))


def pubrec(mid: int, reason_code: int) -> bytes:
    return b"\x50\x03" + _U16S.pack(mid) + bytes((reason_code,))


def pubcomp(mid: int, reason_code: int) -> bytes:
    return b"\x70\x03" + _U16S.pack(mid) + bytes((reason_code,))


def disconnect(reason_code: int = 0) -> bytes:
    return b"\xe0\x00" if reason_code == 0 else b"\xe0\x01" + bytes((reason_code,))


# --------------------------------------------------------------------- packets in


def split_packet(buf: bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, body start, body end) of the packet at `pos`, None if incomplete."""
    end = len(buf)
    if pos >= end:
        return None
    found = read_varint(buf, pos + 1, end)
    if found is None:
        return None
    length, start = found
    if start + length > end:
        return None
    return buf[pos], start, start + length


def decode_publish(first: int, body: bytes) -> Message:
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    size = _U16S.unpack_from(body, 0)[0]
    topic = body[2 : 2 + size].decode(errors="replace")
    pos = 2 + size
    mid = 0
    if qos:
        mid = _U16S.unpack_from(body, pos)[0]
        pos += 2
    if body[pos] == 0:  # the common case: no properties
        return Message(topic, body[pos + 1 :], qos, bool(first & 1), mid, bool(first & 0x08))
    props, users, pos = decode_properties(body, pos)
    if TOPIC_ALIAS in props:
        # We advertise no Topic Alias Maximum, so a broker must never send one.
        raise ProtocolError("topic alias received without being allowed")
    corr = props.get(CORRELATION_DATA)
    return Message(
        topic,
        body[pos:],
        qos,
        bool(first & 1),
        mid,
        bool(first & 0x08),
        response_topic=props.get(RESPONSE_TOPIC),  # type: ignore[arg-type]
        correlation_data=None if corr is None else bytes(corr),  # type: ignore[call-overload]
        user_properties=users,
        content_type=props.get(CONTENT_TYPE),  # type: ignore[arg-type]
    )


def decode_connack(body: bytes) -> ConnAck:
    if len(body) < 2:
        raise ProtocolError("short CONNACK")
    if len(body) == 2:
        return ConnAck(bool(body[0] & 1), body[1], {}, mqtt5=False)
    props, _users, _end = decode_properties(body, 2)
    return ConnAck(bool(body[0] & 1), body[1], props)


def decode_ack(body: bytes) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK (or PUBREL)."""
    if len(body) < 2:
        raise ProtocolError("short PUBACK")
    return _U16S.unpack_from(body, 0)[0], body[2] if len(body) > 2 else 0


def ack_reason_string(body: bytes) -> str | None:
    """The Reason String of a PUBACK, if it has one (only refusals are looked at)."""
    if len(body) <= 3:
        return None
    props, _users, _end = decode_properties(body, 3)
    found = props.get(REASON_STRING)
    return found if isinstance(found, str) else None


def decode_suback(body: bytes) -> tuple[int, list[int]]:
    if len(body) < 3:
        raise ProtocolError("short SUBACK")
    mid = _U16S.unpack_from(body, 0)[0]
    _props, _users, pos = decode_properties(body, 2)
    codes = list(body[pos:])
    if not codes:
        raise ProtocolError("SUBACK without a reason code")
    return mid, codes


def decode_disconnect(body: bytes) -> tuple[int, str | None]:
    if not body:
        return 0, None
    reason: str | None = None
    if len(body) > 1:
        props, _users, _end = decode_properties(body, 1)
        found = props.get(REASON_STRING)
        reason = found if isinstance(found, str) else None
    return body[0], reason
