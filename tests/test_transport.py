"""The transport boundary: what the daemon does with what a broker announces.

Real mosquitto where it can show the case (retained redelivery, `max_qos 0`),
on whichever backend the run uses (`--mqtt-client`); a scripted peer for
what mosquitto never does (an MQTT 3.1.1 CONNACK, a downgraded SUBACK, a
capped session expiry, a lost session on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import LogCapture

from provisiond import mqtt
from provisiond.mqtt import codec
from provisiond.transport import (
    SEND_RETAINED_IF_NEW,
    Delivery,
    Subscription,
    Transport,
)
from tests.mqtt_peer import Peer, connack, suback_filters
from tests.support import Broker, eventually, make_config, mqtt_client


@contextlib.asynccontextmanager
async def transport_running(
    transport: Transport, subs: list[Subscription], got: list[Delivery]
) -> AsyncIterator[asyncio.Task[None]]:
    async def on_message(delivery: Delivery) -> None:
        got.append(delivery)
        transport.ack(delivery)

    task = asyncio.create_task(transport.run(subs, on_message))
    try:
        yield task
    finally:
        await transport.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 5)
        task.cancel()


def peer_config(tmp_path: Path, peer: Peer, **mqtt_values: Any) -> Any:
    broker = Broker(tmp_path / "unused", port=peer.port)
    return make_config(tmp_path, broker, uses_store=False, mqtt={"client": "native", **mqtt_values})


def events(logs: LogCapture, name: str) -> list[dict[str, Any]]:
    return [e for e in logs.entries if e["event"] == name]


async def test_a_broker_answering_in_mqtt_311_is_refused_by_name_and_backed_off(
    tmp_path: Path, logs: LogCapture
) -> None:
    """Like RabbitMQ: a 2-byte CONNACK (return code 1) and the socket closed."""
    peer = await Peer(connack=lambda _n: b"\x20\x02\x00\x01", close_after_connack=True).start()
    config = peer_config(tmp_path, peer, reconnect_min_seconds=0.1, reconnect_max_seconds=0.4)
    transport = Transport(config)
    try:
        async with transport_running(transport, [Subscription("p/rpc/#", 1)], []):
            await asyncio.sleep(1.5)
            assert not transport.subscribed.is_set()
            # One line per attempt: read while it runs, between two attempts
            # (a stop may cut the last attempt off before its CONNACK is read).
            await eventually(lambda: len(events(logs, "mqtt.connect_refused")) == peer.connections)
            attempts = peer.connections
    finally:
        await peer.stop()
    refused = events(logs, "mqtt.connect_refused")
    # Attempts back off (0.1 s doubling to 0.4 s, jittered).
    assert 2 <= attempts <= 10
    assert all("does not speak MQTT 5" in e["error"] for e in refused)
    assert all("3.1.1" in e["error"] for e in refused)
    assert not events(logs, "mqtt.connected")
    assert not peer.kind(codec.SUBSCRIBE & 0xF0)


async def test_one_subscribe_with_retain_handling_and_none_when_the_session_is_resumed(
    tmp_path: Path, logs: LogCapture
) -> None:
    present = {1: False, 2: True, 3: False}
    props = [(codec.SESSION_EXPIRY, 60), (codec.REASON_STRING, "welcome")]
    peer = await Peer(
        connack=lambda n: connack(session_present=present.get(n, True), props=props)
    ).start()
    config = peer_config(tmp_path, peer, session_expiry_seconds=300)
    transport = Transport(config)
    subs = [Subscription("p/rpc/#", 1), Subscription("p/devices/+/status", 1)]
    try:
        async with transport_running(transport, subs, []):
            for n in (1, 2, 3):
                await eventually(lambda n=n: transport.connections == n and transport.is_connected)
                if n < 3:
                    peer.drop()
    finally:
        await peer.stop()
    (first,) = peer.kind(codec.SUBSCRIBE & 0xF0, conn=1)
    assert suback_filters(first) == [("p/rpc/#", 0x11), ("p/devices/+/status", 0x11)]
    assert SEND_RETAINED_IF_NEW == 1
    assert peer.kind(codec.SUBSCRIBE & 0xF0, conn=2) == []  # the session still holds them
    assert len(peer.kind(codec.SUBSCRIBE & 0xF0, conn=3)) == 1  # session lost: subscribe again
    assert len(events(logs, "mqtt.session_lost")) == 1
    assert "may be gone" in events(logs, "mqtt.session_lost")[0]["effect"]
    capped = events(logs, "mqtt.session_expiry_capped")
    assert (capped[0]["asked"], capped[0]["granted"]) == (300, 60)
    assert events(logs, "mqtt.connack_reason")[0]["reason"] == "welcome"


async def test_a_downgraded_suback_is_not_ready_and_names_the_filter(
    tmp_path: Path, logs: LogCapture
) -> None:
    peer = await Peer(grant=lambda t, qos: 0 if t.endswith("status") else qos).start()
    config = peer_config(tmp_path, peer, reconnect_min_seconds=0.2)
    transport = Transport(config)
    subs = [Subscription("p/rpc/#", 1), Subscription("p/devices/+/status", 1)]
    try:
        async with transport_running(transport, subs, []):
            await eventually(lambda: events(logs, "mqtt.subscribe_downgraded"))
            await asyncio.sleep(0.3)
            assert not transport.subscribed.is_set()
    finally:
        await peer.stop()
    (downgraded, *_) = events(logs, "mqtt.subscribe_downgraded")
    assert downgraded == {
        "event": "mqtt.subscribe_downgraded",
        "topic": "p/devices/+/status",
        "asked": 1,
        "granted": 0,
        "log_level": "error",
    }
    assert (
        "downgraded the subscription to p/devices/+/status"
        in (events(logs, "mqtt.connect_refused")[0]["error"])
    )


async def test_a_broker_with_max_qos_0_is_not_served(tmp_path: Path, logs: LogCapture) -> None:
    """mosquitto `max_qos 0`: requests would arrive at QoS 0, lost on any hiccup."""
    b = Broker(tmp_path / "b", extra="max_qos 0").start()
    try:
        config = make_config(tmp_path, b, uses_store=False, mqtt={"reconnect_min_seconds": 0.2})
        transport = Transport(config)
        async with transport_running(transport, [Subscription("p/rpc/#", 1)], []):
            await eventually(lambda: events(logs, "mqtt.connect_refused"))
            await asyncio.sleep(0.3)
            assert not transport.subscribed.is_set()
    finally:
        b.stop()
    assert events(logs, "mqtt.maximum_qos_too_low")[0]["maximum_qos"] == 0
    assert "at most QoS 0" in events(logs, "mqtt.connect_refused")[0]["error"]


async def test_retained_statuses_are_not_redelivered_when_the_session_resumes(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    """100k retained statuses would come back at every reconnect otherwise."""
    config = make_config(tmp_path, broker, uses_store=False)
    prefix = config.mqtt.topic_prefix
    async with mqtt.Client("127.0.0.1", broker.port) as device:
        await device.publish(f"{prefix}/devices/7/status", b"offline", qos=1, retain=True)
    transport = Transport(config)
    got: list[Delivery] = []
    subs = [Subscription(f"{prefix}/devices/+/status", 1), Subscription(f"{prefix}/rpc/#", 1)]
    async with transport_running(transport, subs, got):
        await eventually(lambda: transport.is_connected and got)
        # Another client takes the session over: the broker disconnects the
        # daemon (0x8E), then the taker leaves the session to the daemon again.
        async with mqtt.Client(
            "127.0.0.1",
            broker.port,
            client_id=config.mqtt.client_id,
            clean_start=False,
            session_expiry=300,
        ):
            pass
        await eventually(lambda: transport.connections == 2 and transport.is_connected, 10)
        async with mqtt.Client("127.0.0.1", broker.port) as device:
            await device.publish(f"{prefix}/devices/8/status", b"online", qos=1)
        await eventually(lambda: len(got) >= 2)
        await asyncio.sleep(0.3)
    assert [(d.topic.rsplit("/", 2)[1], d.payload, d.retain) for d in got] == [
        ("7", b"offline", True),
        ("8", b"online", False),
    ]
    connected = events(logs, "mqtt.connected")
    assert [e["session_present"] for e in connected] == [False, True]
    assert [e["resubscribed"] for e in connected] == [True, False]
    async with mqtt.Client("127.0.0.1", broker.port) as device:
        await device.publish(f"{prefix}/devices/7/status", b"", qos=1, retain=True)


@pytest.mark.skipif(mqtt_client() != "native", reason="the native client sees PUBACK reason codes")
async def test_the_backend_in_use_is_the_one_configured(tmp_path: Path, broker: Broker) -> None:
    transport = Transport(make_config(tmp_path, broker, uses_store=False))
    assert transport.backend.name == "native"
    assert transport.backend.fused_ack and transport.backend.sees_refusals


async def test_the_aiomqtt_backend_serves_rpc_through_the_same_boundary(
    tmp_path: Path, broker: Broker
) -> None:
    """Whatever the run's backend: one request over the compatibility one."""
    from provisiond.transport import load_backend

    config = make_config(tmp_path, broker, uses_store=False, mqtt={"client": "aiomqtt"})
    transport = Transport(config)
    assert transport.backend.name == "aiomqtt"
    assert load_backend("aiomqtt").fused_ack is False
    got: list[Delivery] = []
    prefix = config.mqtt.topic_prefix
    async with transport_running(transport, [Subscription(f"{prefix}/rpc/#", 1)], got):
        await eventually(lambda: transport.is_connected)
        assert transport.session is not None and transport.session.session_present is False
        reply_to = f"replies-{uuid.uuid4().hex}"
        async with mqtt.Client("127.0.0.1", broker.port) as caller:
            await caller.subscribe(reply_to, qos=1)
            await caller.publish(
                f"{prefix}/rpc/x", b"{}", qos=1, response_topic=reply_to, correlation_data=b"c1",
                user_properties=[("authorization", "Bearer k")],
            )  # fmt: skip
            await eventually(lambda: got)
            (request,) = got
            assert (request.response_topic, request.correlation_data) == (reply_to, b"c1")
            assert list(request.user_properties) == [("authorization", "Bearer k")]
            await transport.publish(
                reply_to, b"answer", correlation_data=request.correlation_data, ack=request
            )
            async with asyncio.timeout(5):
                async for message in caller.messages():
                    assert (message.payload, message.correlation_data) == (b"answer", b"c1")
                    break


def test_a_backend_whose_packages_are_missing_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from provisiond import backends

    monkeypatch.setitem(backends.BACKENDS, "aiomqtt", "no_such_mqtt_package.backend:Backend")
    with pytest.raises(backends.BackendUnavailable, match="pip install 'provisiond\\[aiomqtt\\]'"):
        backends.load_backend("aiomqtt")
    with pytest.raises(backends.UnknownBackend, match="choose one of native, aiomqtt"):
        backends.load_backend("h11")
