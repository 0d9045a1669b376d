"""A scripted MQTT peer for what no real broker here does on demand: answer in
MQTT 3.1.1, downgrade a SUBACK, cap the session expiry, send QoS 2 unasked.

It records every packet the client sends, per connection, and answers
CONNECT, SUBSCRIBE and QoS 1 PUBLISH as told.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from provisiond.mqtt import codec


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    header = b""
    while True:
        header += await reader.readexactly(1)
        found = codec.read_varint(header, 0, len(header))
        if found is not None:
            return first, await reader.readexactly(found[0])


def connack(
    *,
    session_present: bool = False,
    reason: int = 0,
    props: list[tuple[int, object]] = (),  # type: ignore[assignment]
) -> bytes:
    body = bytes((int(session_present), reason)) + codec.encode_properties(props)
    return b"\x20" + codec.varint(len(body)) + body


def suback_filters(body: bytes) -> list[tuple[str, int]]:
    """(filter, options byte) of each filter in a SUBSCRIBE body."""
    _props, _users, pos = codec.decode_properties(body, 2)
    out = []
    while pos < len(body):
        size = int.from_bytes(body[pos : pos + 2], "big")
        out.append((body[pos + 2 : pos + 2 + size].decode(), body[pos + 2 + size]))
        pos += 3 + size
    return out


@dataclass
class Peer:
    # CONNACK for the n-th connection (1-based); None: close without answering.
    connack: Callable[[int], bytes | None] = lambda _n: connack()
    # Granted code per filter (filter, asked QoS) -> code.
    grant: Callable[[str, int], int] = lambda _t, qos: qos
    # Sent right after the CONNACK.
    after_connect: bytes = b""
    # Close the connection right after the CONNACK (a 3.1.1 broker refusing).
    close_after_connack: bool = False
    packets: list[tuple[int, int, bytes]] = field(default_factory=list)  # (conn, first, body)
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> Peer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def kind(self, first: int, conn: int | None = None) -> list[bytes]:
        return [b for c, f, b in self.packets if f & 0xF0 == first and conn in (None, c)]

    def drop(self) -> None:
        """Close the newest connection (a broker restart, as the client sees it)."""
        self.writers[-1].transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.connections += 1
        n = self.connections
        try:
            first, body = await read_packet(reader)
            self.packets.append((n, first, body))
            answer = self.connack(n)
            if answer is None:
                writer.close()
                return
            writer.write(answer + self.after_connect)
            await writer.drain()
            if self.close_after_connack:
                writer.close()
                return
            while True:
                first, body = await read_packet(reader)
                self.packets.append((n, first, body))
                kind = first & 0xF0
                if kind == codec.SUBSCRIBE & 0xF0:
                    codes = bytes(self.grant(t, o & 3) for t, o in suback_filters(body))
                    reply = body[:2] + b"\x00" + codes
                    writer.write(b"\x90" + codec.varint(len(reply)) + reply)
                elif kind == codec.PUBLISH and first & 0x06:
                    size = int.from_bytes(body[:2], "big")
                    writer.write(codec.puback(int.from_bytes(body[2 + size : 4 + size], "big")))
                elif first == codec.PINGREQ:
                    writer.write(b"\xd0\x00")
                elif first == codec.DISCONNECT:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
