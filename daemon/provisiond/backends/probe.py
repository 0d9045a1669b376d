"""Does a broker that would not answer our MQTT 5 CONNECT speak MQTT 3.1.1?

Some 3.1.1-only brokers (RabbitMQ 3.x) cannot parse an MQTT 5 CONNECT and
hang up without any CONNACK. Asking once in 3.1.1 lets the daemon say "the
broker does not speak MQTT 5" instead of "connection closed". Self-contained
(a 3.1.1 CONNECT is a few bytes), so every backend can use it.
"""

from __future__ import annotations

import asyncio
import ssl
import struct


def _field(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def _length(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def probe_mqtt311(
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    username: str | None,
    password: bytes | None,
    client_id: str,
    wait_seconds: float,
) -> int | None:
    """The CONNACK return code a broker gives an MQTT 3.1.1 CONNECT; None if it gives none.

    A clean session under a client id of its own (never the caller's, which
    would take its session over), disconnected at once.
    """
    probe_id = f"{client_id[:40]}-v311-probe" if client_id else ""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + b"\x00\x0a" + _field(probe_id.encode())
    if username is not None:
        body += _field(username.encode())
    if password is not None:
        body += _field(password)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(min(wait_seconds, 5.0)):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=host if tls is not None else None
            )
            writer.write(b"\x10" + _length(len(body)) + body)
            answer = await reader.readexactly(4)
            if answer[:2] != b"\x20\x02":
                return None
            if answer[3] == 0:
                writer.write(b"\xe0\x00")  # DISCONNECT
            return answer[3]
    except (OSError, TimeoutError, asyncio.IncompleteReadError, UnicodeEncodeError):
        return None
    finally:
        if writer is not None:
            writer.close()
