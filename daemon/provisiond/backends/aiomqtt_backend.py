"""The compatibility backend: aiomqtt (paho-mqtt underneath), `[mqtt] client = "aiomqtt"`.

For brokers or setups where the daemon's own client misbehaves: aiomqtt and
paho are widely used and tested against many brokers. What it cannot do
(docs/architecture.md, "MQTT backends"):

- Manual acks exist only through paho internals: aiomqtt's wrapper is given
  paho's `manual_ack_set(True)` and `ack(mid, qos)` directly.
- Broker refusals are invisible: aiomqtt drops the PUBACK reason code, so a
  publish the broker refuses (ACL, quota) looks delivered; `PublishRefused`
  is raised only for what the client itself refuses.
- No fused reply+ack: a request's PUBACK goes out after its reply's PUBACK
  came back, one round trip later than with the native client.
- About 2.5x the CPU per request (bench/README.md).

CONNACK properties and the session flag are read by wrapping paho's
`on_connect` hook, so the transport honours them here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Unpack

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from provisiond.backends.probe import probe_mqtt311
from provisiond.backends.types import (
    BrokerNotMqtt5,
    ConnectionLost,
    ConnectOptions,
    ConnectRefused,
    Delivery,
    PublishOptions,
    PublishRefused,
    SessionInfo,
    Subscription,
)


def _prop(props: Any, name: str) -> Any:
    return None if props is None else getattr(props, name, None)


class AiomqttConnection:
    def __init__(self, options: ConnectOptions, number: int) -> None:
        self._options = options
        self._number = number
        self.session = SessionInfo(session_present=None)
        self.dropped = 0
        self._connected = False
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if options.session_expiry:
            props.SessionExpiryInterval = options.session_expiry
        if options.receive_maximum < 65535:
            props.ReceiveMaximum = options.receive_maximum
        if options.maximum_packet_size:
            props.MaximumPacketSize = options.maximum_packet_size
        will = options.will
        self._client = aiomqtt.Client(
            options.host,
            options.port,
            identifier=options.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=options.clean_start,
            keepalive=options.keepalive,
            timeout=options.connect_timeout,
            username=options.username,
            password=None if options.password is None else options.password.decode(),
            tls_context=options.tls,
            will=None
            if will is None
            else aiomqtt.Will(will.topic, will.payload, qos=will.qos, retain=will.retain),
            properties=props,
            max_inflight_messages=max(20, min(options.receive_maximum, 1000)),
        )
        paho = self._client._client
        # Acks by hand, after the message was handled: paho's own switch, which
        # aiomqtt does not expose.
        paho.manual_ack_set(True)
        hook: Any = paho.on_connect

        def on_connect(
            client: Any, userdata: Any, flags: Any, reason: Any, props: Any = None
        ) -> None:
            self.session = SessionInfo(
                session_present=bool(getattr(flags, "session_present", False)),
                session_expiry=_prop(props, "SessionExpiryInterval"),
                receive_maximum=_prop(props, "ReceiveMaximum"),
                maximum_qos=_prop(props, "MaximumQoS"),
                retain_available=None
                if _prop(props, "RetainAvailable") is None
                else bool(_prop(props, "RetainAvailable")),
                maximum_packet_size=_prop(props, "MaximumPacketSize"),
                server_keepalive=_prop(props, "ServerKeepAlive"),
                assigned_client_id=_prop(props, "AssignedClientIdentifier"),
                reason_string=_prop(props, "ReasonString"),
                wildcard_available=None,
                shared_available=None,
            )
            hook(client, userdata, flags, reason, props)

        paho.on_connect = on_connect

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self) -> SessionInfo:
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            rc: Any = exc.rc
            code = int(getattr(rc, "value", rc or 0x80))
            if code in (0x84, 1):
                raise BrokerNotMqtt5(None) from None
            raise ConnectRefused(code, reason_string=str(exc)) from None
        except aiomqtt.MqttError as exc:
            # paho reports a broker that hangs up at an MQTT 5 CONNECT (RabbitMQ
            # 3.x) as a timeout: ask once in 3.1.1, as the native client does.
            o = self._options
            v311 = await probe_mqtt311(
                o.host, o.port, o.tls, o.username, o.password, o.client_id, o.connect_timeout
            )
            if v311 is not None:
                raise BrokerNotMqtt5(v311, hung_up=True) from None
            raise ConnectionLost(f"cannot connect to {o.host}:{o.port}: {exc}") from None
        self._connected = True
        return self.session

    async def disconnect(self, *, with_will: bool = False) -> None:
        if not self._connected:
            return
        self._connected = False
        if with_will:
            self._client._client.disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
            )
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> list[int]:
        filters = [
            (s.topic, SubscribeOptions(qos=s.qos, retainHandling=s.retain_handling))
            for s in subscriptions
        ]
        try:
            codes = await self._client.subscribe(filters)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(str(exc)) from None
        granted: list[Any] = list(codes)
        return [int(getattr(code, "value", code)) for code in granted]

    async def publish(self, topic: str, payload: bytes, **options: Unpack[PublishOptions]) -> None:
        ack = options.get("ack")
        qos = options.get("qos", 0)
        retain = options.get("retain", False)
        correlation_data = options.get("correlation_data")
        response_topic = options.get("response_topic")
        user_properties = options.get("user_properties", ())
        message_expiry = options.get("message_expiry")
        if qos > (self.session.maximum_qos if self.session.maximum_qos is not None else 2):
            raise PublishRefused(topic, 0x9B)
        if retain and self.session.retain_available is False:
            raise PublishRefused(topic, 0x9A)
        props: Properties | None = None
        if correlation_data is not None or response_topic or user_properties or message_expiry:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if user_properties:
                props.UserProperty = list(user_properties)
            if message_expiry:
                props.MessageExpiryInterval = message_expiry
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(str(exc)) from None
        except ValueError as exc:  # paho refuses a packet too large before sending it
            raise PublishRefused(topic, 0x95, str(exc)) from None
        if ack is not None:
            # Only once the reply is the broker's: never an ack without its reply.
            self.ack(ack)

    def ack(self, delivery: Delivery) -> None:
        handle = delivery.handle
        if isinstance(handle, _Acked) and delivery.qos == 1 and not handle.done and self._connected:
            handle.done = True
            self._client._client.ack(handle.mid, 1)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        number = self._number
        try:
            async for m in self._client.messages:
                props = m.properties
                corr = _prop(props, "CorrelationData")
                payload = m.payload
                yield Delivery(
                    m.topic.value,
                    payload if isinstance(payload, bytes) else str(payload or "").encode(),
                    m.qos,
                    m.retain,
                    number,
                    _prop(props, "ResponseTopic"),
                    None if corr is None else bytes(corr),
                    _prop(props, "UserProperty") or (),
                    _prop(props, "ContentType"),
                    False,
                    _Acked(m.mid),
                )
        except aiomqtt.MqttError as exc:
            self._connected = False
            raise ConnectionLost(str(exc)) from None
        self._connected = False
        raise ConnectionLost("connection closed")


class _Acked:
    """A paho packet id acked at most once (ids are reused after their ack)."""

    __slots__ = ("done", "mid")

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self.done = False


class AiomqttBackend:
    name = "aiomqtt"
    fused_ack = False
    sees_refusals = False

    def connection(self, options: ConnectOptions, number: int) -> AiomqttConnection:
        return AiomqttConnection(options, number)
