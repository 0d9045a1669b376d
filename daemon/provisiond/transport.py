"""The broker connection: MQTT v5 (`provisiond.mqtt`), reconnecting with capped backoff.

The session is persistent (clean start off) and QoS 1 messages are
acknowledged by hand, only after they were handled: a request the broker
delivered is either answered or redelivered after a crash, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from provisiond import mqtt
from provisiond.config import Config, read_secret, resolve_path, secret_path
from provisiond.logs import get_logger
from provisiond.mqtt import PublishRefused

# Features take the broker's refusals from here, never from provisiond.mqtt.
__all__ = ["Delivery", "NotConnected", "PublishRefused", "Subscription", "Transport"]

log = get_logger("provisiond.transport")

# A connection that lasted this long resets the reconnect backoff.
STABLE_SECONDS = 10.0


@dataclass(frozen=True)
class Delivery:
    """A received message and the connection it came on (acks go to that one only)."""

    message: mqtt.Message
    connection: int

    @property
    def topic(self) -> str:
        return self.message.topic

    @property
    def payload(self) -> bytes:
        return self.message.payload


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
        self._client: mqtt.Client | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._stopping = False
        self.connections = 0
        self._dropped_earlier = 0
        self.status_topic = f"{config.mqtt.topic_prefix}/daemon/status"

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: the packet limit follows from the next connection on
        (the `mqtt` section itself is restart-only)."""
        self._config = config

    @property
    def is_connected(self) -> bool:
        return self._client is not None and self.connected.is_set()

    async def _client_kwargs(self) -> dict[str, object]:
        cfg = self._config.mqtt
        kwargs: dict[str, object] = {}
        if cfg.username:
            kwargs["username"] = cfg.username
            if cfg.password_file:
                kwargs["password"] = await asyncio.to_thread(
                    read_secret, self._config, cfg.password_file, key="mqtt.password_file"
                )
        if cfg.tls.enabled:
            kwargs["tls"] = await asyncio.to_thread(self._tls_context)
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

    async def run(
        self,
        subscriptions: Sequence[Subscription],
        on_message: MessageHandler,
    ) -> None:
        """Connect, subscribe and feed messages to `on_message` until `stop()`."""
        cfg = self._config.mqtt
        delay = cfg.reconnect_min_seconds
        kwargs = await self._client_kwargs()
        while not self._stopping:
            retry_in = 0.0
            up_since: float | None = None
            client = mqtt.Client(
                cfg.host,
                cfg.port,
                client_id=cfg.client_id,
                clean_start=False,
                keepalive=cfg.keepalive_seconds,
                session_expiry=cfg.session_expiry_seconds,
                receive_maximum=cfg.receive_maximum,
                maximum_packet_size=max_packet_size(self._config),
                will=mqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
                **kwargs,  # type: ignore[arg-type]
            )
            try:
                async with client:
                    self._client = client
                    self.connections += 1
                    up_since = time.monotonic()
                    for sub in subscriptions:
                        granted = await client.subscribe(sub.topic, qos=sub.qos)
                        _check_granted(sub, granted)
                    await client.publish(self.status_topic, b"online", qos=1, retain=True)
                    self.connected.set()
                    self.subscribed.set()
                    log.info(
                        "mqtt.connected",
                        host=cfg.host,
                        port=cfg.port,
                        subscriptions=len(subscriptions),
                    )
                    connection = self.connections
                    async for message in client.messages():
                        await on_message(Delivery(message, connection))
            except mqtt.MqttError as exc:
                if self._stopping:
                    break
                # Backoff starts over only after a connection that held: one that
                # drops right after CONNACK (a broker refusing something we do at
                # once, every time) keeps backing off instead of looping.
                if up_since is not None and time.monotonic() - up_since >= STABLE_SECONDS:
                    delay = cfg.reconnect_min_seconds
                retry_in = delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter only
                log.warning("mqtt.disconnected", error=str(exc), retry_in=round(retry_in, 2))
                delay = min(delay * 2, cfg.reconnect_max_seconds)
            finally:
                self.connected.clear()
                self._client = None
                self._dropped_earlier += client.dropped
            await asyncio.sleep(retry_in)

    async def stop(self) -> None:
        """Disconnect cleanly: the broker drops our will instead of publishing it."""
        self._stopping = True
        client = self._client
        if client is not None:
            with contextlib.suppress(mqtt.MqttError, TimeoutError):
                async with asyncio.timeout(2):
                    await client.publish(self.status_topic, b"offline", qos=1, retain=True)
            # A normal DISCONNECT makes the run loop's `async for` end.
            await client.disconnect()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        ack: Delivery | None = None,
    ) -> None:
        """Publish; `ack`: a delivery to acknowledge together with it (see mqtt.Client.publish)."""
        client = self._client
        if client is None:
            raise NotConnected(topic)
        if ack is not None and ack.connection != self.connections:
            ack = None  # came on an earlier connection: the broker redelivers it instead
        try:
            await client.publish(
                topic,
                payload,
                qos=qos,
                retain=retain,
                correlation_data=correlation_data,
                ack=None if ack is None else ack.message,
            )
        except PublishRefused:
            raise  # the broker said no: not a lost connection, and not worth a retry
        except mqtt.MqttError as exc:
            raise NotConnected(str(exc)) from exc

    @property
    def dropped(self) -> int:
        """QoS 0 messages dropped because the daemon fell behind, since start."""
        client = self._client
        return self._dropped_earlier + (0 if client is None else client.dropped)

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a QoS 1 message; after a reconnect the broker redelivers it instead."""
        client = self._client
        if client is not None and delivery.connection == self.connections:
            client.ack(delivery.message)


def max_packet_size(config: Config) -> int:
    """The largest packet the broker may send us.

    Requests up to four times `daemon.max_payload_bytes` still reach the
    router and get their 413 reply; the broker drops anything larger instead
    of making the daemon buffer it (4 MiB at least, so a small payload limit
    never starves the router of the packets it should refuse by name).
    """
    return max(4 * 1024 * 1024, 4 * config.daemon.max_payload_bytes)


SUBACK_REASONS = {
    0x80: "unspecified error", 0x83: "implementation specific error",
    0x87: "not authorized", 0x8F: "topic filter invalid", 0x97: "quota exceeded",
    0x9E: "shared subscriptions not supported", 0xA2: "wildcard subscriptions not supported",
}  # fmt: skip


def _check_granted(sub: Subscription, granted: Sequence[int]) -> None:
    """A SUBACK can refuse (ACL, shared subscriptions unsupported): then we are not ready.

    Raised as an MqttError, the run loop retries with backoff and READY=1 is
    not sent, instead of serving while deaf to a topic.
    """
    for code in granted:
        if code >= 0x80:
            reason = f"{SUBACK_REASONS.get(code, 'refused')} (0x{code:02x})"
            log.error("mqtt.subscribe_refused", topic=sub.topic, reason=reason)
            raise mqtt.MqttError(f"broker refused the subscription to {sub.topic}: {reason}")
