"""The broker connection: MQTT v5 on aiomqtt, reconnecting with capped backoff.

The session is persistent (clean start off) and QoS 1 messages are
acknowledged by hand, only after they were handled: a request the broker
delivered is either answered or redelivered after a crash, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from provisiond.config import Config, read_secret, resolve_path, secret_path
from provisiond.logs import get_logger

log = get_logger("provisiond.transport")


@dataclass(frozen=True)
class Delivery:
    """A received message and the connection it came on (acks go to that one only)."""

    message: aiomqtt.Message
    connection: int

    @property
    def topic(self) -> str:
        return self.message.topic.value

    @property
    def payload(self) -> bytes:
        payload = self.message.payload
        if isinstance(payload, bytes | bytearray):
            return bytes(payload)
        return str(payload).encode() if payload is not None else b""


MessageHandler = Callable[[Delivery], Awaitable[None]]


class NotConnected(Exception):
    """Publishing failed because the broker connection is down."""


@dataclass(frozen=True)
class Subscription:
    topic: str
    qos: int = 1


class Transport:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._stopping = False
        self.connections = 0
        self.status_topic = f"{config.mqtt.topic_prefix}/daemon/status"

    @property
    def is_connected(self) -> bool:
        return self._client is not None and self.connected.is_set()

    async def _client_kwargs(self) -> dict[str, object]:
        mqtt = self._config.mqtt
        kwargs: dict[str, object] = {}
        if mqtt.username:
            kwargs["username"] = mqtt.username
            if mqtt.password_file:
                secret = await asyncio.to_thread(
                    read_secret, self._config, mqtt.password_file, key="mqtt.password_file"
                )
                kwargs["password"] = secret.decode()
        if mqtt.tls.enabled:
            kwargs["tls_context"] = await asyncio.to_thread(self._tls_context)
            if mqtt.tls.insecure:
                kwargs["tls_insecure"] = True
        return kwargs

    def _tls_context(self) -> ssl.SSLContext:
        tls = self._config.mqtt.tls
        ctx = ssl.create_default_context(
            cafile=str(resolve_path(self._config, tls.ca_file)) if tls.ca_file else None
        )
        if tls.cert_file:
            ctx.load_cert_chain(
                str(resolve_path(self._config, tls.cert_file)),
                str(secret_path(self._config, tls.key_file)) if tls.key_file else None,
            )
        if tls.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._config.mqtt.session_expiry_seconds
        props.ReceiveMaximum = self._config.mqtt.receive_maximum
        return props

    async def run(
        self,
        subscriptions: Sequence[Subscription],
        on_message: MessageHandler,
    ) -> None:
        """Connect, subscribe and feed messages to `on_message` until `stop()`."""
        mqtt = self._config.mqtt
        delay = mqtt.reconnect_min_seconds
        kwargs = await self._client_kwargs()
        while not self._stopping:
            client = aiomqtt.Client(
                mqtt.host,
                mqtt.port,
                identifier=mqtt.client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                keepalive=mqtt.keepalive_seconds,
                properties=self._connect_properties(),
                # Without TCP_NODELAY, Nagle holds small replies for ~40 ms twice per round trip.
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
                max_queued_outgoing_messages=0,
                **kwargs,  # type: ignore[arg-type]
            )
            # Acknowledge QoS 1 only once handled (see module docstring). aiomqtt does
            # not expose this paho switch, so we reach the wrapped client.
            client._client.manual_ack_set(True)
            try:
                async with client:
                    self._client = client
                    self.connections += 1
                    delay = mqtt.reconnect_min_seconds
                    for sub in subscriptions:
                        granted = await client.subscribe(sub.topic, qos=sub.qos)
                        _check_granted(sub, granted)
                    await client.publish(self.status_topic, b"online", qos=1, retain=True)
                    self.connected.set()
                    self.subscribed.set()
                    log.info(
                        "mqtt.connected",
                        host=mqtt.host,
                        port=mqtt.port,
                        subscriptions=len(subscriptions),
                    )
                    connection = self.connections
                    async for message in client.messages:
                        await on_message(Delivery(message, connection))
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    break
                self.connected.clear()
                self._client = None
                log.warning("mqtt.disconnected", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter only
                delay = min(delay * 2, mqtt.reconnect_max_seconds)
            finally:
                self.connected.clear()
                self._client = None

    async def stop(self) -> None:
        """Disconnect cleanly: the broker drops our will instead of publishing it."""
        self._stopping = True
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.status_topic, b"offline", qos=1, retain=True, timeout=2)
            # A normal DISCONNECT makes the run loop's `async for` end.
            client._client.disconnect()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        client = self._client
        if client is None:
            raise NotConnected(topic)
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except aiomqtt.MqttError as exc:
            raise NotConnected(str(exc)) from exc

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a QoS 1 message; after a reconnect the broker redelivers it instead."""
        client = self._client
        if (
            client is not None
            and delivery.message.qos > 0
            and delivery.connection == self.connections
        ):
            client._client.ack(delivery.message.mid, delivery.message.qos)


def _check_granted(sub: Subscription, granted: Sequence[object]) -> None:
    """A SUBACK can refuse (ACL, shared subscriptions unsupported): then we are not ready.

    Raised as an MqttError, the run loop retries with backoff and READY=1 is
    not sent, instead of serving while deaf to a topic.
    """
    for code in granted:
        value = getattr(code, "value", code)
        if isinstance(value, int) and value >= 0x80:
            log.error("mqtt.subscribe_refused", topic=sub.topic, reason=str(code))
            raise aiomqtt.MqttError(f"broker refused the subscription to {sub.topic}: {code}")
