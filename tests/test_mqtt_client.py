"""The daemon's own MQTT client (provisiond.mqtt) against a real mosquitto.

Interoperability is checked against aiomqtt/paho as the independent peer.
Framing and malformed packets, which mosquitto never produces, are checked
against a scripted TCP peer.
"""

from __future__ import annotations

import asyncio
import gc
import getpass
import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from provisiond import mqtt
from provisiond.mqtt import codec
from tests.mqtt_peer import Peer, connack, read_packet
from tests.support import Broker


def topic() -> str:
    return f"t/{uuid.uuid4().hex}"


def client(broker: Broker, **kwargs: object) -> mqtt.Client:
    return mqtt.Client("127.0.0.1", broker.port, **kwargs)  # type: ignore[arg-type]


async def next_message(c: mqtt.Client, timeout: float = 5) -> mqtt.Message:
    async with asyncio.timeout(timeout):
        async for message in c.messages():
            return message
    raise AssertionError("message stream ended")


async def test_properties_survive_a_trip_through_mosquitto_to_paho_and_back(
    broker: Broker,
) -> None:
    to_paho, to_us = topic(), topic()
    async with (
        client(broker) as ours,
        aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as paho,
    ):
        await paho.subscribe(to_paho, qos=1)
        assert await ours.subscribe(to_us, qos=1) == [1]

        await ours.publish(
            to_paho, b"\x00\xffbody", qos=1, correlation_data=b"\x01corr",
            response_topic="replies/\u00e9", user_properties=[("k", "v\u2713"), ("k", "2")],
        )  # fmt: skip
        async with asyncio.timeout(5):
            got = await anext(aiter(paho.messages))
        assert got.payload == b"\x00\xffbody"
        assert got.qos == 1
        assert got.properties.CorrelationData == b"\x01corr"  # type: ignore[union-attr]
        assert got.properties.ResponseTopic == "replies/\u00e9"  # type: ignore[union-attr]
        assert got.properties.UserProperty == [("k", "v\u2713"), ("k", "2")]  # type: ignore[union-attr]

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "r/1"
        props.CorrelationData = b"abc"
        props.UserProperty = [("authorization", "Bearer x")]
        props.ContentType = "application/json"
        await paho.publish(to_us, b"x" * 70_000, qos=1, properties=props)
        message = await next_message(ours)
        assert message.topic == to_us
        assert message.payload == b"x" * 70_000  # a 3-byte remaining length
        assert (message.qos, message.retain, message.mid > 0) == (1, False, True)
        assert message.response_topic == "r/1"
        assert message.correlation_data == b"abc"
        assert message.user_properties == [("authorization", "Bearer x")]
        assert message.content_type == "application/json"
        ours.ack(message)


async def test_an_unacknowledged_message_is_redelivered_to_the_persistent_session(
    broker: Broker,
) -> None:
    t, cid = topic(), f"c-{uuid.uuid4().hex[:8]}"
    session = {"client_id": cid, "clean_start": False, "session_expiry": 60}
    first = client(broker, **session)
    await first.connect()
    await first.subscribe(t, qos=1)
    async with client(broker) as publisher:
        await publisher.publish(t, b"one", qos=1)
        message = await next_message(first)
        assert message.payload == b"one"
        # A crash: the socket closes with no DISCONNECT and no PUBACK.
        first._transport.abort()  # type: ignore[union-attr]
        await first.disconnect()

        async with client(broker, **session) as second:
            again = await next_message(second)
            assert (again.payload, again.dup) == (b"one", True)
            # The ack rides in the same write as this publish; it must still land.
            await second.publish(topic(), b"reply", qos=1, ack=again)

        async with client(broker, **session) as third:
            await publisher.publish(t, b"two", qos=1)
            assert (await next_message(third)).payload == b"two"  # "one" is gone


async def test_many_concurrent_publishes_under_a_small_receive_maximum_arrive_in_order(
    tmp_path: Path,
) -> None:
    b = Broker(tmp_path / "b", extra="max_inflight_messages 3").start()
    try:
        t = topic()
        async with client(b) as sub, client(b) as pub:
            await sub.subscribe(t, qos=1)
            assert pub.connack is not None
            assert pub.connack.properties[codec.RECEIVE_MAXIMUM] == 3
            await asyncio.gather(*(pub.publish(t, str(i).encode(), qos=1) for i in range(200)))
            got = []
            async with asyncio.timeout(10):
                async for message in sub.messages():
                    got.append(int(message.payload))
                    sub.ack(message)
                    if len(got) == 200:
                        break
            assert got == list(range(200))
            assert pub.is_connected
    finally:
        b.stop()


async def test_a_qos0_flood_beyond_the_queue_is_dropped_and_nothing_else_stalls(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that falls behind loses QoS 0 messages past the cap (counted), never
    QoS 1 ones, and its own publishes still get their PUBACKs meanwhile."""
    monkeypatch.setattr(mqtt.client, "MAX_QUEUED_QOS0", 1000)
    flood, important = topic(), topic()
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe(flood, qos=0)
        await sub.subscribe(important, qos=1)
        for i in range(3000):
            await pub.publish(flood, i.to_bytes(4, "big"))
        for i in range(5):
            await pub.publish(important, bytes([i]), qos=1)
        async with asyncio.timeout(10):
            while sub.dropped < 2000:
                await asyncio.sleep(0.01)
        # Nothing read yet, and the subscriber's own QoS 1 publish completes.
        async with asyncio.timeout(5):
            await sub.publish(topic(), b"mine", qos=1)
        got: list[bytes] = []
        async with asyncio.timeout(10):
            async for message in sub.messages():
                got.append(message.payload)
                sub.ack(message)
                if len(got) == 1005:
                    break
    assert sub.dropped == 2000
    assert got[:1000] == [i.to_bytes(4, "big") for i in range(1000)]
    assert got[1000:] == [bytes([i]) for i in range(5)]


async def test_keepalive_holds_an_idle_connection_and_detects_a_frozen_broker(
    own_broker: Broker,
) -> None:
    t = topic()
    async with client(own_broker, keepalive=1) as c:
        await c.subscribe(t, qos=1)
        await asyncio.sleep(3.5)  # mosquitto drops a silent client after 1.5 x keepalive
        assert c.is_connected
        await c.publish(t, b"still here", qos=1)
        assert (await next_message(c)).payload == b"still here"

        assert own_broker.proc is not None
        os.kill(own_broker.proc.pid, signal.SIGSTOP)  # alive, but answering nothing
        try:
            with pytest.raises(mqtt.ConnectionLost, match="keep-alive"):
                await next_message(c, timeout=5)
        finally:
            os.kill(own_broker.proc.pid, signal.SIGCONT)


async def test_a_killed_broker_ends_the_stream_and_fails_publishes(own_broker: Broker) -> None:
    t = topic()
    c = client(own_broker)
    await c.connect()
    await c.subscribe(t, qos=1)
    async with client(own_broker) as pub:
        for _ in range(20):
            await pub.publish(t, b"unhandled", qos=1)
    async with asyncio.timeout(5):
        while len(c._messages) < 20:
            await asyncio.sleep(0.01)
    own_broker.kill()
    async with asyncio.timeout(5):
        while c.is_connected:
            await asyncio.sleep(0.01)
    # Received but not handled: dropped with the connection (their replies could
    # not go out; the broker redelivers QoS 1 to the session), so the stream
    # ends at once instead of handing them out first.
    with pytest.raises(mqtt.ConnectionLost):
        await next_message(c)
    with pytest.raises(mqtt.ConnectionLost):
        await c.publish(topic(), b"x", qos=1)
    await c.disconnect()


async def test_wrong_password_is_refused_with_the_brokers_reason(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "svc", "right"], check=True)
    # As root, mosquitto would switch to the `mosquitto` user, who cannot read
    # this test's private temp dir.
    extra = f"allow_anonymous false\npassword_file {passwd}\nuser {getpass.getuser()}"
    b = Broker(tmp_path / "b", extra=extra).start()
    try:
        with pytest.raises(mqtt.ConnectRefused) as refused:
            await client(b, username="svc", password=b"wrong").connect()
        assert refused.value.reason_code in (0x86, 0x87)
        assert "wrong" not in str(refused.value)
        async with client(b, username="svc", password=b"right") as c:
            assert c.is_connected
    finally:
        b.stop()


async def test_the_will_is_published_after_a_crash_but_not_after_disconnect(
    broker: Broker,
) -> None:
    status = topic()
    async with client(broker) as watcher:
        await watcher.subscribe(status, qos=1)
        will = mqtt.Will(status, b"offline", qos=1, retain=False)
        async with client(broker, will=will):
            pass  # clean DISCONNECT: the broker discards the will
        crashed = client(broker, will=will)
        await crashed.connect()
        crashed._transport.abort()  # type: ignore[union-attr]
        await crashed.disconnect()
        message = await next_message(watcher)
        assert message.payload == b"offline"
        with pytest.raises(TimeoutError):
            await next_message(watcher, timeout=0.5)  # exactly one will


# --------------------------------------------------------------------- scripted peer


async def scripted_peer(script: list[bytes]) -> tuple[asyncio.Server, int]:
    """A TCP peer that reads the CONNECT and then writes `script` one byte at a time."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await reader.read(1024)
        for chunk in script:
            for i in range(len(chunk)):
                writer.write(chunk[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        await reader.read()  # until the client closes

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


CONNACK = b"\x20\x03\x00\x00\x00"


async def test_packets_split_into_single_bytes_are_reassembled() -> None:
    big = codec.publish("a/\u00e9", b"p" * 300, qos=1, mid=7, correlation_data=b"c")
    small = codec.publish("b", b"", qos=0)
    server, port = await scripted_peer([CONNACK, big + small])
    async with server, mqtt.Client("127.0.0.1", port) as c:
        first = await next_message(c)
        second = await next_message(c)
    assert (first.topic, first.payload, first.mid, first.correlation_data) == (
        "a/\u00e9", b"p" * 300, 7, b"c",
    )  # fmt: skip
    assert (second.topic, second.payload, second.qos) == ("b", b"", 0)


async def test_bad_utf8_from_another_client_does_not_drop_the_connection() -> None:
    # A user property and a topic that are not UTF-8: replaced, not fatal (a
    # fatal error would be redelivered after every reconnect, forever).
    props = b"\x26\x00\x01k\x00\x02\xff\xfe"
    body = b"\x00\x03t/\xff" + b"\x00\x01" + bytes([len(props)]) + props + b"payload"
    server, port = await scripted_peer([CONNACK, b"\x32" + codec.varint(len(body)) + body])
    async with server, mqtt.Client("127.0.0.1", port) as c:
        message = await next_message(c)
    assert message.topic == "t/\ufffd"
    assert message.user_properties == [("k", "\ufffd\ufffd")]
    assert message.payload == b"payload"


@pytest.mark.parametrize(
    ("name", "packet"),
    [
        ("unknown property", b"\x30\x07\x00\x01t\x02\x7f\x00\x00"),
        ("five-byte length", b"\x30\xff\xff\xff\xff\x01"),
        ("QoS 2 without a packet id", b"\x34\x06\x00\x01t\x00\x00\x00"),
        ("QoS 3", b"\x36\x06\x00\x01t\x00\x01\x00"),
        ("truncated field", b"\x30\x02\x00\x09"),
        ("unexpected packet type", b"\x50\x02\x00\x01"),
        ("QoS 1 without a packet id", b"\x32\x03\x00\x01t"),
        ("empty PUBLISH", b"\x30\x00"),
        ("truncated two-byte property", b"\x30\x06\x00\x01t\x02\x21\x00"),
        ("second CONNACK", CONNACK),
    ],
)
async def test_a_malformed_packet_ends_the_connection_with_a_protocol_error(
    name: str, packet: bytes
) -> None:
    server, port = await scripted_peer([CONNACK, packet])
    async with server:
        c = mqtt.Client("127.0.0.1", port)
        await c.connect()
        with pytest.raises(mqtt.ConnectionLost, match="protocol error"):
            await next_message(c)
        await c.disconnect()


@pytest.mark.parametrize("value", [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_variable_byte_integers_round_trip_at_every_width(value: int) -> None:
    encoded = codec.varint(value)
    assert len(encoded) == 1 + (value >= 128) + (value >= 16_384) + (value >= 2_097_152)
    assert codec.read_varint(encoded, 0, len(encoded)) == (value, len(encoded))
    assert codec.read_varint(encoded[:-1], 0, len(encoded) - 1) is None


async def test_no_more_publishes_in_flight_than_the_peer_allows() -> None:
    """Receive Maximum 2 in CONNACK: a third QoS 1 publish waits for a PUBACK."""
    seen: list[int] = []
    writers: list[asyncio.StreamWriter] = []
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await read_packet(reader)  # CONNECT
        writer.write(b"\x20\x06\x00\x00\x03\x21\x00\x02")  # CONNACK, Receive Maximum 2
        while True:  # read everything the client sends, acking only once released
            try:
                first, body = await read_packet(reader)
            except asyncio.IncompleteReadError:
                return
            if first & 0xF0 == codec.PUBLISH:
                seen.append(int.from_bytes(body[3:5], "big"))  # after the topic "t"
                if release.is_set():
                    writer.write(codec.puback(seen[-1]))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, mqtt.Client("127.0.0.1", port) as c:
        # Callers that give up waiting leave their messages in flight: still no
        # more than two out until the peer acks.
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.publish("t", b"x", qos=1), 0.1)
        publishes = asyncio.gather(*(c.publish("t", b"x", qos=1) for _ in range(3)))
        await asyncio.sleep(0.3)
        assert len(seen) == 2  # the other three wait for a free slot
        release.set()
        for mid in list(seen):
            writers[0].write(codec.puback(mid))
        async with asyncio.timeout(5):
            await publishes
        assert len(seen) == 5


async def test_a_refused_connection_raises_once_and_logs_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the broker is down, each reconnect attempt fails; no stray asyncio
    "exception was never retrieved" error may pile up in the operator's log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed

    async def attempt() -> str:
        try:
            await mqtt.Client("127.0.0.1", port).connect()
        except mqtt.ConnectionLost as exc:
            return str(exc)  # the traceback (and the client) are dropped here
        return "connected"

    # Garbage earlier tests left (their clients' futures) is not this client's.
    gc.collect()
    await asyncio.sleep(0)
    caplog.clear()
    assert "cannot connect" in await attempt()
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_a_publish_that_cannot_be_encoded_costs_no_packet_id(broker: Broker) -> None:
    """A topic that is not encodable (a lone surrogate from JSON) fails that publish
    only; its packet id and in-flight slot are given back."""
    t = topic()
    async with client(broker) as c:
        await c.subscribe(t, qos=1)
        for _ in range(1000):
            with pytest.raises(UnicodeEncodeError):
                await c.publish("r/\ud800", b"x", qos=1)
        assert not c._pending
        await c.publish(t, b"fine", qos=1)
        assert (await next_message(c)).payload == b"fine"


# --------------------------------------------------------------------- broker quirks


@pytest.mark.parametrize("return_code", [0, 1, 2, 3, 4, 5])
async def test_a_311_connack_is_refused_as_a_broker_without_mqtt5(return_code: int) -> None:
    """A 3.1.1 broker answers our MQTT 5 CONNECT with a 2-byte CONNACK; its return
    codes 1-5 are not MQTT 5 reason codes (all < 0x80) and used to read as success."""
    peer = await Peer(connack=lambda _n: bytes((0x20, 2, 0, return_code))).start()
    try:
        with pytest.raises(mqtt.BrokerNotMqtt5, match="does not speak MQTT 5") as refused:
            await mqtt.Client("127.0.0.1", peer.port).connect()
        assert refused.value.return_code == return_code
        assert "3.1.1" in str(refused.value)
    finally:
        await peer.stop()


@pytest.mark.parametrize(
    ("code", "name"),
    [(0x97, "quota exceeded"), (0x9B, "QoS not supported"), (0x9F, "connection rate exceeded"),
     (0x9C, "use another server")],
)  # fmt: skip
async def test_a_refusing_connack_names_its_reason_and_carries_the_brokers_words(
    code: int, name: str
) -> None:
    props = [(codec.REASON_STRING, "slow down"), (codec.SERVER_REFERENCE, "other:1883")]
    peer = await Peer(connack=lambda _n: connack(reason=code, props=props)).start()
    try:
        with pytest.raises(mqtt.ConnectRefused) as refused:
            await mqtt.Client("127.0.0.1", peer.port).connect()
        assert refused.value.reason_code == code
        assert refused.value.reason == name
        assert refused.value.reason_string == "slow down"
        assert refused.value.server_reference == "other:1883"
        assert f"{name} (0x{code:02x}): slow down; it points to other:1883" in str(refused.value)
    finally:
        await peer.stop()


async def test_publishes_beyond_maximum_qos_or_retain_available_are_refused_unsent() -> None:
    """The broker would disconnect us (0x9B, 0x9A), losing everything in flight."""
    props = [(codec.MAXIMUM_QOS, 0), (codec.RETAIN_AVAILABLE, 0)]
    peer = await Peer(connack=lambda _n: connack(props=props)).start()
    try:
        async with mqtt.Client("127.0.0.1", peer.port) as c:
            assert (c.maximum_qos, c.retain_available) == (0, False)
            with pytest.raises(mqtt.PublishRefused, match="QoS not supported") as qos:
                await c.publish("a", b"x", qos=1)
            assert qos.value.reason_code == 0x9B
            with pytest.raises(mqtt.PublishRefused, match="retain not supported"):
                await c.publish("a", b"x", retain=True)
            await c.publish("a", b"fine")
            await asyncio.sleep(0.1)
            assert c.is_connected
        assert [b[:3] for b in peer.kind(codec.PUBLISH)] == [b"\x00\x01a"]
    finally:
        await peer.stop()


async def test_a_qos2_delivery_is_refused_with_a_pubrec_and_the_connection_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dropping the connection would loop: the broker redelivers QoS 2 to the session."""
    qos2 = codec.publish("odd", b"two", qos=1, mid=9)
    qos2 = bytes((qos2[0] ^ 0x02 | 0x04,)) + qos2[1:]  # the same packet at QoS 2
    after = qos2 + b"\x62\x02\x00\x09" + codec.publish("next", b"one", qos=0)
    peer = await Peer(after_connect=after).start()
    try:
        async with mqtt.Client("127.0.0.1", peer.port) as c:
            message = await next_message(c)
            assert (message.topic, message.payload) == ("next", b"one")
            assert c.qos2_refused == 1
            await asyncio.sleep(0.1)
            assert c.is_connected
        assert peer.kind(codec.PUBREC) == [b"\x00\x09\x83"]  # refused: the exchange ends
        assert peer.kind(codec.PUBCOMP) == [b"\x00\x09\x92"]  # nothing to release
    finally:
        await peer.stop()


async def test_all_filters_go_in_one_subscribe_with_their_retain_handling() -> None:
    peer = await Peer(grant=lambda t, qos: 0x87 if t == "no" else qos).start()
    try:
        async with mqtt.Client("127.0.0.1", peer.port) as c:
            codes = await c.subscribe_many([("a/#", 1, 1), ("b/+/s", 0, 2), ("no", 1, 0)])
        assert codes == [1, 0, 0x87]
        (subscribe,) = peer.kind(codec.SUBSCRIBE & 0xF0)
        from tests.mqtt_peer import suback_filters

        assert suback_filters(subscribe) == [("a/#", 0x11), ("b/+/s", 0x20), ("no", 0x01)]
    finally:
        await peer.stop()


async def test_a_refused_publish_carries_the_brokers_reason_string() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(connack())
        _first, body = await read_packet(reader)
        mid = body[3:5]
        props = codec.encode_properties([(codec.REASON_STRING, "over quota")])
        writer.write(b"\x40" + codec.varint(3 + len(props)) + mid + b"\x97" + props)
        await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server, mqtt.Client("127.0.0.1", server.sockets[0].getsockname()[1]) as c:
        with pytest.raises(mqtt.PublishRefused) as refused:
            await c.publish("t", b"x", qos=1)
    assert (refused.value.reason_code, refused.value.reason) == (0x97, "quota exceeded")
    assert refused.value.reason_string == "over quota"


async def test_a_peer_that_hangs_up_at_connect_and_speaks_no_311_either_is_a_lost_connection() -> (
    None
):
    """The 3.1.1 probe only names a broker that does answer 3.1.1."""
    peer = await Peer(connack=lambda _n: None).start()
    try:
        with pytest.raises(mqtt.ConnectionLost) as lost:
            await mqtt.Client("127.0.0.1", peer.port, client_id="me").connect()
        assert not isinstance(lost.value, mqtt.BrokerNotMqtt5)
        assert peer.connections == 2  # ours, then the probe
        probe = peer.packets[1][2]
        assert probe[:7] == b"\x00\x04MQTT\x04" and b"me-v311-probe" in probe
    finally:
        await peer.stop()
