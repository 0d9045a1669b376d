"""An asyncio MQTT 5 client built on `asyncio.Protocol`.

Why not aiomqtt (which the tests and the bench load drivers use): under load
the daemon's whole budget per request is about what aiomqtt + paho spend
moving one request and its reply (several `recv` calls per packet, one
`send` per packet, Python-level property objects). This client reads every
packet that arrived in one `data_received`, writes everything queued during
one loop iteration in one `send`, and keeps properties as plain fields.

What it does: connect (clean start or a persistent session, will, user name
and password, TLS), subscribe (several filters in one SUBSCRIBE, with Retain
Handling), publish at QoS 0 and 1 within the broker's Receive Maximum,
Maximum QoS and Retain Available, manual PUBACK of received QoS 1 messages,
keep-alive, and a clean DISCONNECT. A broker that answers in MQTT 3.1.1 is
refused by name (`BrokerNotMqtt5`); a QoS 2 message a broker sends although
nothing asked for QoS 2 is refused with a PUBREC, without dropping the
connection. One instance is one connection: reconnecting is the caller's
loop (see `provisiond.transport`).
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

from provisiond.backends.probe import probe_mqtt311
from provisiond.backends.types import (
    BrokerNotMqtt5,
    ConnectionLost,
    ConnectRefused,
    PublishRefused,
    TransportError,
    Will,
    reason_name,
)
from provisiond.logs import get_logger
from provisiond.mqtt import codec
from provisiond.mqtt.codec import ConnAck, Message, ProtocolError

log = get_logger("provisiond.mqtt")

# QoS 0 messages beyond this many (or bytes) waiting for the consumer are
# dropped and counted in `dropped`. QoS 1 messages are never dropped: the
# Receive Maximum we send bounds how many the broker has in flight to us.
# (Not TCP backpressure: a paused socket would also hold back the PUBACKs
# that the consumer's own publishes wait for, and the consumer would stall.)
MAX_QUEUED_QOS0 = 50_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024

# The client raises the boundary's own errors (`provisiond.backends.types`), so
# the transport passes them through and the features catch one class whatever
# the backend. `MqttError` is every error this client raises.
MqttError = TransportError

# At most this many QoS 2 refusals are logged per connection (all are counted).
QOS2_LOG_LIMIT = 5


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
        # From the CONNACK: publishing beyond them makes the broker disconnect us.
        self.maximum_qos = 2
        self.retain_available = True
        self.qos2_refused = 0  # QoS 2 messages refused on this connection

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
        except ConnectionLost as lost:
            # Closed with no CONNACK at all. Some 3.1.1-only brokers (RabbitMQ 3.x)
            # cannot parse an MQTT 5 CONNECT and just hang up: ask in 3.1.1 once,
            # so the operator reads "no MQTT 5" instead of "connection closed".
            code = await probe_mqtt311(
                self._host, self._port, self._tls, self._username, self._password,
                self._client_id, self._connect_timeout,
            )  # fmt: skip
            if code is not None:
                raise BrokerNotMqtt5(code, hung_up=True) from None
            raise lost from None
        except TimeoutError:
            self._fail_connect(ConnectionLost("timed out connecting to the broker"))
            raise ConnectionLost("timed out connecting to the broker") from None
        except OSError as exc:
            self._fail_connect(ConnectionLost(str(exc)))
            raise ConnectionLost(f"cannot connect to {self._host}:{self._port}: {exc}") from None
        except asyncio.CancelledError:
            self._fail_connect(ConnectionLost("connect cancelled"))
            raise
        if not connack.mqtt5 or connack.reason_code == 0x84:
            # A 3.1.1 broker answers an MQTT 5 CONNECT with its own 2-byte CONNACK
            # (return code 1: unacceptable protocol version). Its codes 1-5 are
            # not MQTT 5 reason codes: read as such, they looked like success.
            refused: ConnectRefused = BrokerNotMqtt5(None if connack.mqtt5 else connack.reason_code)
            self._fail_connect(refused)
            raise refused
        if connack.reason_code >= 0x80:
            props = connack.properties
            why, where = props.get(codec.REASON_STRING), props.get(codec.SERVER_REFERENCE)
            refused = ConnectRefused(
                connack.reason_code,
                reason_string=why if isinstance(why, str) else None,
                server_reference=where if isinstance(where, str) else None,
            )
            self._fail_connect(refused)
            raise refused
        self.connack = connack
        self.maximum_qos = int(connack.properties.get(codec.MAXIMUM_QOS, 2))  # type: ignore[call-overload]
        self.retain_available = bool(connack.properties.get(codec.RETAIN_AVAILABLE, 1))
        self._server_max_packet = int(connack.properties.get(codec.MAXIMUM_PACKET_SIZE, 0))  # type: ignore[call-overload]
        receive_max = connack.properties.get(codec.RECEIVE_MAXIMUM, 65535)
        self._inflight = asyncio.Semaphore(int(receive_max))  # type: ignore[call-overload]
        keepalive = connack.properties.get(codec.SERVER_KEEP_ALIVE, self._keepalive)
        self._keepalive = int(keepalive)  # type: ignore[call-overload]
        if self._keepalive > 0:
            self._keepalive_task = asyncio.create_task(self._keep_alive())
        return connack

    async def disconnect(self, reason_code: int = 0) -> None:
        """Send DISCONNECT (the broker then drops our will; 0x04 asks it to publish
        the will all the same) and close."""
        if self._transport is not None and not self._transport.is_closing():
            self._write(codec.disconnect(reason_code))
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

    async def subscribe(self, topic: str, qos: int = 1, retain_handling: int = 0) -> list[int]:
        """Subscribe to one filter; the broker's reason codes (>= 0x80 = refused)."""
        return await self.subscribe_many([(topic, qos, retain_handling)])

    async def subscribe_many(self, filters: Sequence[tuple[str, int, int]]) -> list[int]:
        """(filter, QoS, retain handling) in one SUBSCRIBE; one reason code each."""
        mid, future = self._register(filters[0][0], holds_slot=False)
        try:
            packet = codec.subscribe(mid, filters)
        except BaseException:
            self._resolve(mid, None)
            raise
        self._write(packet)
        codes: list[int] = await future  # type: ignore[assignment]
        if len(codes) != len(filters):
            self._abort(ConnectionLost("protocol error from the broker: SUBACK code count"))
            raise self._error or ConnectionLost("SUBACK code count")
        return codes

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
        message_expiry: int | None = None,
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
        # The broker would answer either with a DISCONNECT (0x9B / 0x9A), dropping
        # every other message in flight: refuse this one alone instead.
        if qos > self.maximum_qos:
            raise PublishRefused(topic, 0x9B)
        if retain and not self.retain_available:
            raise PublishRefused(topic, 0x9A)
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
                message_expiry=message_expiry,
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
        if isinstance(reason, tuple):  # (reason code, reason string) of a refusal
            raise PublishRefused(topic, reason[0], reason[1])

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
            if message.qos == 2:
                self._refuse_qos2(message)
                return
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
            if reason >= 0x80:
                self._resolve(mid, (reason, codec.ack_reason_string(body)))
            else:
                self._resolve(mid, reason)
        elif first == codec.PUBREL:
            # Only after a PUBREC of ours, which always refuses: nothing to release.
            mid, _reason = codec.decode_ack(body)
            self._write(codec.pubcomp(mid, 0x92))  # packet identifier not found
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
            name = reason_name(code)
            text = f"broker disconnected us: {name} (0x{code:02x}{': ' + why if why else ''})"
            self._abort(ConnectionLost(text))
        else:
            raise ProtocolError(f"unexpected packet type 0x{first:02x}")

    def _refuse_qos2(self, message: Message) -> None:
        """A QoS 2 PUBLISH, though every subscription asked for at most QoS 1.

        Dropping the connection over it would be a loop: the broker redelivers
        it to the session after each reconnect. A PUBREC with a reason code
        >= 0x80 ends the exchange for the broker instead (MQTT 5, 4.3.3), and
        the message is not handed to the daemon, which could not ack it.
        """
        if message.mid == 0:
            raise ProtocolError("QoS 2 PUBLISH without a packet identifier")
        self.qos2_refused += 1
        if self.qos2_refused <= QOS2_LOG_LIMIT:
            log.warning(
                "mqtt.qos2_refused",
                topic=message.topic[:200],
                refused=self.qos2_refused,
                why="the broker sent QoS 2 although every subscription asked for at most QoS 1",
            )
        self._write(codec.pubrec(message.mid, 0x83))  # implementation specific error

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
