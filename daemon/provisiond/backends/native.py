"""The default backend: the daemon's own MQTT 5 client (`provisiond.mqtt`).

It sees everything the boundary names: CONNACK properties, PUBACK and SUBACK
reason codes, and it writes a request's PUBACK right behind its reply in one
write (`publish(..., ack=request)`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Unpack

from provisiond import mqtt
from provisiond.backends.types import (
    ConnectOptions,
    Delivery,
    PacketOptions,
    PublishOptions,
    SessionInfo,
    Subscription,
)
from provisiond.mqtt import codec


def session_info(connack: mqtt.ConnAck) -> SessionInfo:
    props = connack.properties

    def number(ident: int) -> int | None:
        value = props.get(ident)
        return value if isinstance(value, int) else None

    def flag(ident: int) -> bool | None:
        value = number(ident)
        return None if value is None else bool(value)

    def text(ident: int) -> str | None:
        value = props.get(ident)
        return value if isinstance(value, str) else None

    return SessionInfo(
        session_present=connack.session_present,
        session_expiry=number(codec.SESSION_EXPIRY),
        receive_maximum=number(codec.RECEIVE_MAXIMUM),
        maximum_qos=number(codec.MAXIMUM_QOS),
        retain_available=flag(codec.RETAIN_AVAILABLE),
        maximum_packet_size=number(codec.MAXIMUM_PACKET_SIZE),
        server_keepalive=number(codec.SERVER_KEEP_ALIVE),
        assigned_client_id=text(codec.ASSIGNED_CLIENT_ID),
        reason_string=text(codec.REASON_STRING),
        wildcard_available=flag(codec.WILDCARD_AVAILABLE),
        shared_available=flag(codec.SHARED_AVAILABLE),
    )


class NativeConnection:
    def __init__(self, options: ConnectOptions, number: int) -> None:
        self._client = mqtt.Client(
            options.host,
            options.port,
            client_id=options.client_id,
            clean_start=options.clean_start,
            keepalive=options.keepalive,
            session_expiry=options.session_expiry,
            receive_maximum=options.receive_maximum,
            maximum_packet_size=options.maximum_packet_size,
            will=options.will,
            username=options.username,
            password=options.password,
            tls=options.tls,
            connect_timeout=options.connect_timeout,
        )
        self._number = number
        self.session = SessionInfo(session_present=None)

    @property
    def client(self) -> mqtt.Client:
        return self._client

    @property
    def dropped(self) -> int:
        return self._client.dropped

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected

    async def connect(self) -> SessionInfo:
        self.session = session_info(await self._client.connect())
        return self.session

    async def disconnect(self, *, with_will: bool = False) -> None:
        await self._client.disconnect(0x04 if with_will else 0)

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> list[int]:
        return await self._client.subscribe_many(
            [(s.topic, s.qos, s.retain_handling) for s in subscriptions]
        )

    async def publish(self, topic: str, payload: bytes, **options: Unpack[PublishOptions]) -> None:
        ack = options.pop("ack", None)
        handle = None if ack is None else ack.handle
        packet: PacketOptions = options  # `ack` is popped: the rest goes into the packet
        await self._client.publish(
            topic, payload, ack=handle if isinstance(handle, mqtt.Message) else None, **packet
        )

    def ack(self, delivery: Delivery) -> None:
        handle = delivery.handle
        if isinstance(handle, mqtt.Message):
            self._client.ack(handle)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        number = self._number
        async for m in self._client.messages():
            yield Delivery(
                m.topic,
                m.payload,
                m.qos,
                m.retain,
                number,
                m.response_topic,
                m.correlation_data,
                m.user_properties,
                m.content_type,
                m.dup,
                m,
            )


class NativeBackend:
    name = "native"
    fused_ack = True
    sees_refusals = True

    def connection(self, options: ConnectOptions, number: int) -> NativeConnection:
        return NativeConnection(options, number)
