"""An asyncio MQTT 5 client built on `asyncio.Protocol`.

Why not aiomqtt (which the tests, the CLI and the simulator use): under load
the daemon's whole budget per request is about what aiomqtt + paho spend
moving one request and its reply (several `recv` calls per packet, one
`send` per packet, Python-level property objects). This client reads every
packet that arrived in one `data_received`, writes everything queued during
one loop iteration in one `send`, and keeps properties as plain fields.

What it does: connect (clean start or a persistent session, will, user name
and password, TLS), subscribe, publish at QoS 0 and 1 within the broker's
Receive Maximum, manual PUBACK of received QoS 1 messages, keep-alive, and
a clean DISCONNECT. One instance is one connection: reconnecting is the
caller's loop (see `provisiond.transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from provisiond.mqtt import codec
from provisiond.mqtt.codec import ConnAck, Message, ProtocolError, Will

# QoS 0 messages beyond this many (or bytes) waiting for the consumer are
# dropped and counted in `dropped`. QoS 1 messages are never dropped: the
# Receive Maximum we send bounds how many the broker has in flight to us.
# (Not TCP backpressure: a paused socket would also hold back the PUBACKs
# that the consumer's own publishes wait for, and the consumer would stall.)
MAX_QUEUED_QOS0 = 50_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024

CONNECT_REASONS = {
    0x80: "unspecified error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy",
    0x8A: "banned", 0x8C: "bad authentication method",
}  # fmt: skip


class MqttError(Exception):
    """Any failure of the connection or of a request on it."""


class ConnectionLost(MqttError):
    """The connection closed (or was never established)."""


class ConnectRefused(MqttError):
    def __init__(self, reason_code: int) -> None:
        name = CONNECT_REASONS.get(reason_code, "refused")
        super().__init__(f"broker refused the connection: {name} (0x{reason_code:02x})")
        self.reason_code = reason_code


class PublishRefused(MqttError):
    def __init__(self, topic: str, reason_code: int) -> None:
        super().__init__(f"broker refused the publish to {topic!r} (0x{reason_code:02x})")
        self.topic = topic
        self.reason_code = reason_code


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client._made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._client._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._lost(exc)

    def pause_writing(self) -> None:
        self._client._writable.clear()

    def resume_writing(self) -> None:
        self._client._writable.set()


class Client:
    """One MQTT 5 connection. Use as `async with Client(...) as client:`."""

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str = "",
        clean_start: bool = True,
        keepalive: int = 60,
        session_expiry: int = 0,
        receive_maximum: int = 65535,
        maximum_packet_size: int = 0,
        will: Will | None = None,
        username: str | None = None,
        password: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._client_id = client_id
        self._clean_start = clean_start
        self._keepalive = keepalive
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        # 0: no limit. Otherwise the broker must not send us a larger packet
        # (MQTT 5: it drops it), so no one can make us buffer more than this.
        self._maximum_packet_size = maximum_packet_size
        self._will = will
        self._username = username
        self._password = password
        self._tls = tls
        self._connect_timeout = connect_timeout

        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._connack: asyncio.Future[ConnAck] | None = None
        # packet id -> (future, topic, holds an in-flight slot)
        self._pending: dict[int, tuple[asyncio.Future[object], str, bool]] = {}
        self._next_mid = 0
        self._inflight: asyncio.Semaphore | None = None
        self._messages: deque[Message | None] = deque()
        self._queued_bytes = 0
        self._message_ready: asyncio.Event = asyncio.Event()
        self._server_max_packet = 0
        self.dropped = 0  # QoS 0 messages dropped because the consumer fell behind
        self._closed: asyncio.Future[None] | None = None
        self._error: MqttError | None = None
        self._last_received = time.monotonic()
        self._keepalive_task: asyncio.Task[None] | None = None
        self.connack: ConnAck | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def connect(self) -> ConnAck:
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._connack = loop.create_future()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: _Protocol(self),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
                self._write(
                    codec.connect(
                        client_id=self._client_id,
                        clean_start=self._clean_start,
                        keepalive=self._keepalive,
                        session_expiry=self._session_expiry,
                        receive_maximum=self._receive_maximum,
                        maximum_packet_size=self._maximum_packet_size,
                        will=self._will,
                        username=self._username,
                        password=self._password,
                    )
                )
                connack = await self._connack
        except TimeoutError:
            self._fail_connect(ConnectionLost("timed out connecting to the broker"))
            raise ConnectionLost("timed out connecting to the broker") from None
        except OSError as exc:
            self._fail_connect(ConnectionLost(str(exc)))
            raise ConnectionLost(f"cannot connect to {self._host}:{self._port}: {exc}") from None
        except asyncio.CancelledError:
            self._fail_connect(ConnectionLost("connect cancelled"))
            raise
        if connack.reason_code >= 0x80:
            self._fail_connect(ConnectRefused(connack.reason_code))
            raise ConnectRefused(connack.reason_code)
        self.connack = connack
        self._server_max_packet = int(connack.properties.get(codec.MAXIMUM_PACKET_SIZE, 0))  # type: ignore[call-overload]
        receive_max = connack.properties.get(codec.RECEIVE_MAXIMUM, 65535)
        self._inflight = asyncio.Semaphore(int(receive_max))  # type: ignore[call-overload]
        keepalive = connack.properties.get(codec.SERVER_KEEP_ALIVE, self._keepalive)
        self._keepalive = int(keepalive)  # type: ignore[call-overload]
        if self._keepalive > 0:
            self._keepalive_task = asyncio.create_task(self._keep_alive())
        return connack

    async def disconnect(self) -> None:
        """Send DISCONNECT (the broker then drops our will) and close."""
        if self._transport is not None and not self._transport.is_closing():
            self._write(codec.disconnect())
            self._flush()
            self._transport.close()
        await self._wait_closed()

    async def _wait_closed(self) -> None:
        if self._closed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), 2)
            except TimeoutError:
                # A full write buffer to a broker that stopped reading: drop it.
                if self._transport is not None:
                    self._transport.abort()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive_task

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and self._error is None

    # ----------------------------------------------------------------- requests

    async def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        """Subscribe to one filter; the broker's reason codes (>= 0x80 = refused)."""
        mid, future = self._register(topic, holds_slot=False)
        self._write(codec.subscribe(mid, topic, qos))
        return await future  # type: ignore[return-value]

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
        ack: Message | None = None,
    ) -> None:
        """Publish; at QoS 1, return once the broker acknowledged it.

        `ack`: a received message to acknowledge right behind this publish,
        in the same write. The broker reads the stream in order, so it can
        only see the ack after it has taken this message: a reply and the
        ack of its request are never separated, without waiting a round trip
        for the reply's own PUBACK first.
        """
        self._check()
        if not self._writable.is_set():
            await self._writable.wait()  # the socket's buffer is full: wait for it to drain
            self._check()

        def packet(mid: int) -> bytes:
            return codec.publish(
                topic,
                payload,
                qos=qos,
                retain=retain,
                mid=mid,
                correlation_data=correlation_data,
                response_topic=response_topic,
                user_properties=user_properties,
            )

        if qos == 0:
            data = packet(0)
            if self._server_max_packet and len(data) > self._server_max_packet:
                raise PublishRefused(topic, 0x95)
            self._write(data)
            if ack is not None:
                self.ack(ack)
            return
        inflight = self._inflight
        assert inflight is not None, "publish before connect"
        # The slot is given back when the PUBACK arrives (or the connection
        # ends), not when this call ends: a caller that gives up waiting
        # (cancelled) leaves the message in flight for the broker all the same.
        await inflight.acquire()
        try:
            mid, future = self._register(topic, holds_slot=True)
        except BaseException:
            inflight.release()
            raise
        try:
            data = packet(mid)
            if self._server_max_packet and len(data) > self._server_max_packet:
                raise PublishRefused(topic, 0x95)  # "packet too large", never sent
        except BaseException:
            self._resolve(mid, None)
            raise
        self._write(data)
        if ack is not None:
            self.ack(ack)
        reason = await future
        if isinstance(reason, int) and reason >= 0x80:
            raise PublishRefused(topic, reason)

    def ack(self, message: Message) -> None:
        """PUBACK a QoS 1 message received on this connection."""
        if message.qos == 1 and not message.acked and self.is_connected:
            message.acked = True
            self._write(codec.puback(message.mid))

    async def messages(self) -> AsyncIterator[Message]:
        """Received messages in order; raises the connection's error once it ends."""
        while True:
            while not self._messages:
                self._message_ready.clear()
                await self._message_ready.wait()
            message = self._messages.popleft()
            if message is None:
                self._messages.append(None)  # stays ended for any later reader
                raise self._error or ConnectionLost("connection closed")
            self._queued_bytes -= len(message.payload)
            yield message

    # ----------------------------------------------------------------- internals

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._transport is None:
            raise ConnectionLost("not connected")

    def _register(self, topic: str, *, holds_slot: bool) -> tuple[int, asyncio.Future[object]]:
        self._check()
        mid = self._next_mid
        for _ in range(65535):
            mid = mid % 65535 + 1
            if mid not in self._pending:
                break
        else:  # pragma: no cover - the Receive Maximum keeps far fewer in flight
            raise MqttError("no free packet identifier")
        self._next_mid = mid
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[mid] = (future, topic, holds_slot)
        return mid, future

    def _write(self, packet: bytes) -> None:
        self._out.append(packet)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Everything queued in this loop iteration leaves in one send().
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _keep_alive(self) -> None:
        interval = self._keepalive
        while True:
            await asyncio.sleep(interval * 0.5)
            if time.monotonic() - self._last_received > interval * 1.5:
                self._abort(ConnectionLost("broker stopped answering (keep-alive timeout)"))
                return
            self._write(codec.PINGREQ_PACKET)

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def _feed(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        buf = self._buffer
        buf += data
        pos = 0
        try:
            while True:
                found = codec.split_packet(buf, pos)
                if found is None:
                    break
                first, start, end = found
                self._dispatch(first, bytes(buf[start:end]))
                pos = end
        except (ProtocolError, IndexError, ValueError, struct.error) as exc:
            # IndexError / struct.error: a field runs past the end of its packet.
            self._abort(ConnectionLost(f"protocol error from the broker: {exc}"))
            return
        finally:
            del buf[:pos]

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == codec.PUBLISH:
            message = codec.decode_publish(first, body)
            size = len(message.payload)
            if message.qos == 0 and (
                len(self._messages) >= MAX_QUEUED_QOS0
                or self._queued_bytes + size > MAX_QUEUED_BYTES
            ):
                self.dropped += 1
                return
            self._queued_bytes += size
            self._messages.append(message)
            self._message_ready.set()
        elif kind == codec.PUBACK:
            mid, reason = codec.decode_ack(body)
            self._resolve(mid, reason)
        elif kind == codec.SUBACK:
            mid, codes = codec.decode_suback(body)
            self._resolve(mid, codes)
        elif kind == codec.CONNACK:
            if self._connack is None or self._connack.done():
                raise ProtocolError("CONNACK after the connection was set up")
            self._connack.set_result(codec.decode_connack(body))
        elif kind == codec.PINGRESP:
            pass
        elif kind == codec.DISCONNECT:
            code, why = codec.decode_disconnect(body)
            text = f"broker disconnected us (0x{code:02x}{': ' + why if why else ''})"
            self._abort(ConnectionLost(text))
        else:
            raise ProtocolError(f"unexpected packet type 0x{first:02x}")

    def _resolve(self, mid: int, result: object) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        future, _topic, holds_slot = entry
        if holds_slot and self._inflight is not None:
            self._inflight.release()
        if not future.done():
            future.set_result(result)

    def _fail_connect(self, error: MqttError) -> None:
        self._abort(error)
        connack = self._connack
        if connack is not None and connack.done() and not connack.cancelled():
            connack.exception()  # raised to the caller as `error`; mark it seen

    def _abort(self, error: MqttError) -> None:
        if self._error is None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()
        else:
            self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = ConnectionLost(f"connection lost: {exc}" if exc else "connection closed")
        error = self._error
        for future, _topic, holds_slot in self._pending.values():
            if holds_slot and self._inflight is not None:
                self._inflight.release()  # wakes publishers waiting for a slot; they fail
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(error)
        # Messages not yet handled are dropped: their replies and acks could not
        # go out any more, and the broker redelivers QoS 1 to the session.
        self._messages.clear()
        self._queued_bytes = 0
        self._messages.append(None)
        self._message_ready.set()
        self._writable.set()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._keepalive_task is not None and self._keepalive_task is not asyncio.current_task():
            self._keepalive_task.cancel()
