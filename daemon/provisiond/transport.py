"""The broker connection: one typed boundary over an MQTT 5 backend, reconnecting
with capped backoff.

Feature modules import MQTT types from here only: `Delivery` (a received
message), `Subscription`, `ConnectOptions`, `SessionInfo` and the refusals
(`PublishRefused`, `NotConnected`, `ConnectRefused`, `BrokerNotMqtt5`,
`SubscribeRefused`). The backend (`[mqtt] client`, see `provisiond.backends`)
is the daemon's own client by default, or aiomqtt for compatibility.

The session is persistent (clean start off) and QoS 1 messages are
acknowledged by hand, only after they were handled: a request the broker
delivered is either answered or redelivered after a crash, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Unpack

from provisiond.backends import BACKENDS, BackendUnavailable, UnknownBackend, load_backend
from provisiond.backends.types import (
    SEND_RETAINED,
    SEND_RETAINED_IF_NEW,
    Backend,
    BrokerNotMqtt5,
    BrokerUnsuitable,
    Connection,
    ConnectionLost,
    ConnectOptions,
    ConnectRefused,
    Delivery,
    NotConnected,
    PublishOptions,
    PublishRefused,
    SessionInfo,
    SubscribeRefused,
    Subscription,
    TransportError,
    Will,
    reason_name,
)
from provisiond.config import Config, read_secret, resolve_path, secret_path
from provisiond.logs import get_logger

__all__ = [
    "BACKENDS",
    "SEND_RETAINED",
    "SEND_RETAINED_IF_NEW",
    "Backend",
    "BackendUnavailable",
    "BrokerNotMqtt5",
    "BrokerUnsuitable",
    "ConnectOptions",
    "ConnectRefused",
    "Connection",
    "ConnectionLost",
    "Delivery",
    "MessageHandler",
    "NotConnected",
    "PublishRefused",
    "SessionInfo",
    "SubscribeRefused",
    "Subscription",
    "Transport",
    "TransportError",
    "UnknownBackend",
    "Will",
    "check_granted",
    "connect_options",
    "load_backend",
    "max_packet_size",
]


log = get_logger("provisiond.transport")

# A connection that lasted this long resets the reconnect backoff.
STABLE_SECONDS = 10.0

MessageHandler = Callable[[Delivery], Awaitable[None]]


async def connect_options(
    config: Config,
    *,
    client_id: str | None = None,
    clean_start: bool = False,
    will: Will | None = None,
    connect_timeout: float = 10.0,
) -> ConnectOptions:
    """The daemon's broker settings as one connection's options: credentials and
    TLS read the same way for the daemon and for a CLI command beside it."""
    cfg = config.mqtt
    password: bytes | None = None
    if cfg.username and cfg.password_file:
        password = await asyncio.to_thread(
            read_secret, config, cfg.password_file, key="mqtt.password_file"
        )
    tls = await asyncio.to_thread(tls_context, config) if cfg.tls.enabled else None
    return ConnectOptions(
        host=cfg.host,
        port=cfg.port,
        client_id=cfg.client_id if client_id is None else client_id,
        clean_start=clean_start,
        keepalive=cfg.keepalive_seconds,
        session_expiry=0 if clean_start else cfg.session_expiry_seconds,
        receive_maximum=cfg.receive_maximum,
        maximum_packet_size=max_packet_size(config),
        will=will,
        username=cfg.username or None,
        password=password,
        tls=tls,
        connect_timeout=connect_timeout,
    )


def tls_context(config: Config) -> ssl.SSLContext:
    tls = config.mqtt.tls
    ctx = ssl.create_default_context(
        cafile=str(resolve_path(config, tls.ca_file)) if tls.ca_file else None
    )
    if tls.cert_file:
        ctx.load_cert_chain(
            str(resolve_path(config, tls.cert_file)),
            str(secret_path(config, tls.key_file)) if tls.key_file else None,
        )
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Transport:
    """One broker connection of the daemon: connect, subscribe, deliver, publish, reconnect.

    The daemon's main link keeps a persistent session and announces the daemon
    on `P/daemon/status` (with a will). A `link` for device topics shared by a
    group of daemons (`[mqtt] shared_group`) starts clean each time and says
    nothing: when its daemon dies, the broker stops handing it heartbeats at
    once, instead of keeping them for a session nobody reads.
    """

    def __init__(
        self, config: Config, backend: Backend | None = None, *, link: str | None = None
    ) -> None:
        self._config = config
        # A named extra link: its own client id, a clean session, no status topic.
        self.link = link
        self.backend = backend if backend is not None else load_backend(config.mqtt.client)
        self._conn: Connection | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._stopping = False
        self.connections = 0
        self._dropped_earlier = 0
        self.status_topic = f"{config.mqtt.topic_prefix}/daemon/status"
        self.session: SessionInfo | None = None
        # The filters the broker's session holds for us, once a SUBACK granted them.
        self._subscribed_filters: tuple[Subscription, ...] | None = None
        # Cleared when the broker refuses retained messages (Retain Available 0).
        self._retain = True
        # Lowered when the broker refuses a QoS 1 will (0x9B): the next CONNACK
        # then says what the broker allows, and that is what gets logged.
        self._will_qos = 1

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: the packet limit follows from the next connection on
        (the `mqtt` section itself is restart-only)."""
        self._config = config

    @property
    def is_connected(self) -> bool:
        return self._conn is not None and self.connected.is_set()

    async def run(
        self,
        subscriptions: Sequence[Subscription],
        on_message: MessageHandler,
    ) -> None:
        """Connect, subscribe and feed messages to `on_message` until `stop()`."""
        cfg = self._config.mqtt
        delay = cfg.reconnect_min_seconds
        subs = tuple(subscriptions)
        while not self._stopping:
            retry_in = 0.0
            up_since: float | None = None
            if self.link is None:
                options = await connect_options(
                    self._config,
                    will=Will(
                        self.status_topic, b"offline", qos=self._will_qos, retain=self._retain
                    ),
                )
            else:
                client_id = f"{self._config.mqtt.client_id}-{self.link}"
                options = await connect_options(self._config, client_id=client_id, clean_start=True)
            conn = self.backend.connection(options, self.connections + 1)
            try:
                session = await conn.connect()
                self._conn = conn
                self.connections += 1
                up_since = time.monotonic()
                await self._on_connected(conn, session, subs)
                async for delivery in conn.deliveries():
                    await on_message(delivery)
            except TransportError as exc:
                if self._stopping:
                    break
                # Backoff starts over only after a connection that held: one that
                # drops right after CONNACK (a broker refusing something we do at
                # once, every time) keeps backing off instead of looping.
                if up_since is not None and time.monotonic() - up_since >= STABLE_SECONDS:
                    delay = cfg.reconnect_min_seconds
                retry_in = delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter only
                delay = min(delay * 2, cfg.reconnect_max_seconds)
                if self._adapt_to(exc):
                    retry_in = 0.0
                    continue
                if isinstance(exc, ConnectRefused | SubscribeRefused | BrokerUnsuitable):
                    # One line per attempt, and attempts back off: a broker that says
                    # no the same way every time costs a line every 30 s at most.
                    log.error("mqtt.connect_refused", error=str(exc), retry_in=round(retry_in, 2))
                else:
                    log.warning("mqtt.disconnected", error=str(exc), retry_in=round(retry_in, 2))
            finally:
                self.connected.clear()
                self._conn = None
                self._dropped_earlier += conn.dropped
                if up_since is not None:
                    with contextlib.suppress(TransportError):
                        await conn.disconnect()
            await asyncio.sleep(retry_in)

    async def _on_connected(
        self, conn: Connection, session: SessionInfo, subs: tuple[Subscription, ...]
    ) -> None:
        """Subscribe unless the session kept them, say `online`, and report ready."""
        cfg = self._config.mqtt
        self.session = session
        self._check_session(session, subs)
        # A resumed session still holds the subscriptions: a SUBSCRIBE
        # would only cost a round trip (and, without Retain Handling,
        # every retained message again).
        resubscribe = not (session.session_present and self._subscribed_filters == subs)
        if resubscribe and subs:
            self._subscribed_filters = None
            granted = await conn.subscribe(subs)
            check_granted(subs, granted)
            self._subscribed_filters = subs
        if self.link is None:
            await conn.publish(self.status_topic, b"online", qos=1, retain=self._retain)
        self.connected.set()
        self.subscribed.set()
        log.info(
            "mqtt.connected",
            link=self.link or "main",
            host=cfg.host,
            port=cfg.port,
            client=self.backend.name,
            subscriptions=len(subs),
            session_present=session.session_present,
            resubscribed=resubscribe,
        )

    def _adapt_to(self, exc: TransportError) -> bool:
        """A refusal our own CONNECT caused, and the next one avoids: retry at once."""
        if isinstance(exc, ConnectRefused) and exc.reason_code == 0x9A and self._retain:
            # Retain not supported: our retained will was the cause.
            self._retain = False
            log.warning(
                "mqtt.retain_unavailable",
                effect="the daemon status and its will are published unretained",
            )
            return True
        if isinstance(exc, ConnectRefused) and exc.reason_code == 0x9B and self._will_qos:
            self._will_qos = 0
            return True
        return False

    def _check_session(self, session: SessionInfo, subs: Sequence[Subscription]) -> None:
        """Honour what the CONNACK announced, or say what it costs."""
        asked = self._config.mqtt.session_expiry_seconds
        if session.reason_string:
            log.info("mqtt.connack_reason", reason=session.reason_string)
        if session.maximum_qos is not None and session.maximum_qos < max(
            (s.qos for s in subs), default=1
        ):
            log.error(
                "mqtt.maximum_qos_too_low",
                maximum_qos=session.maximum_qos,
                needed=1,
                effect="requests could be lost unacknowledged; not serving",
            )
            raise BrokerUnsuitable(
                f"the broker allows at most QoS {session.maximum_qos}; the daemon needs QoS 1"
            )
        if session.retain_available is False and self._retain:
            self._retain = False
            log.warning(
                "mqtt.retain_unavailable",
                effect="the daemon status and its will are published unretained",
            )
        if session.session_expiry is not None and session.session_expiry < asked:
            log.warning(
                "mqtt.session_expiry_capped",
                asked=asked,
                granted=session.session_expiry,
                effect="requests queued for the daemon are kept only this long while it is away",
            )
        if session.session_present is False and asked > 0 and self.link is None:
            if self.connections > 1:
                log.warning(
                    "mqtt.session_lost",
                    effect="requests and messages queued while the daemon was disconnected "
                    "may be gone; subscribing again",
                )
            else:
                log.info("mqtt.session_new")

    async def stop(self) -> None:
        """Disconnect cleanly: the broker drops our will instead of publishing it."""
        self._stopping = True
        conn = self._conn
        if conn is not None:
            if self.link is None:
                with contextlib.suppress(TransportError, TimeoutError):
                    async with asyncio.timeout(2):
                        await conn.publish(
                            self.status_topic, b"offline", qos=1, retain=self._retain
                        )
            # A normal DISCONNECT makes the run loop's `async for` end.
            await conn.disconnect()

    async def publish(self, topic: str, payload: bytes, **options: Unpack[PublishOptions]) -> None:
        """Publish; `ack`: a delivery to acknowledge together with it (see mqtt.Client.publish).

        Raises `PublishRefused` when the broker says no (not worth a retry) and
        `NotConnected` when the link is down or goes down before the PUBACK. A
        QoS 1 publish cut off that way is not sent again by the transport (see
        docs/architecture.md, "What a disconnect loses", for each kind).
        """
        options.setdefault("qos", 1)  # the daemon's messages matter unless a caller says not
        conn = self._conn
        if conn is None:
            raise NotConnected(topic)
        ack = options.get("ack")
        if ack is not None and ack.connection != self.connections:
            options["ack"] = None  # came on an earlier connection: the broker redelivers it
        try:
            await conn.publish(topic, payload, **options)
        except (PublishRefused, NotConnected):
            raise
        except TransportError as exc:
            raise NotConnected(str(exc)) from exc

    @property
    def dropped(self) -> int:
        """QoS 0 messages dropped because the daemon fell behind, since start."""
        conn = self._conn
        return self._dropped_earlier + (0 if conn is None else conn.dropped)

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a QoS 1 message; after a reconnect the broker redelivers it instead."""
        conn = self._conn
        if conn is not None and delivery.connection == self.connections:
            conn.ack(delivery)


async def request_reply(
    conn: Connection,
    topic: str,
    payload: bytes,
    *,
    reply_topic: str,
    wait_seconds: float,
    **options: Unpack[PublishOptions],
) -> Delivery | None:
    """One MQTT v5 request on a connection of its own: the reply (the delivery whose
    correlation data is this request's, which a fresh random value makes unguessable),
    or None if the connection ends first. Anything else delivered meanwhile is acked
    and dropped. `wait_seconds` bounds the wait for the reply, not the sending."""
    correlation = uuid.uuid4().bytes
    await conn.subscribe([Subscription(reply_topic, 1)])
    options["qos"] = 1
    options["response_topic"] = reply_topic
    options["correlation_data"] = correlation
    await conn.publish(topic, payload, **options)
    async with asyncio.timeout(wait_seconds):
        async for delivery in conn.deliveries():
            conn.ack(delivery)
            if delivery.correlation_data == correlation:
                return delivery
    return None


async def rpc_request(
    conn: Connection,
    prefix: str,
    operation: str,
    body: dict[str, Any],
    *,
    key: str | None,
    reply_topic: str,
    wait_seconds: float,
    **options: Unpack[PublishOptions],
) -> dict[str, Any] | None:
    """One RPC request to the daemon as docs/protocol.md has it (a JSON body on
    `{prefix}/rpc/{operation}`, the API key as a bearer user property when there is
    one) by `request_reply`: the reply envelope, or None if the connection ends first."""
    if key is not None:
        options["user_properties"] = [("authorization", f"Bearer {key}")]
    topic = f"{prefix}/rpc/{operation}"
    payload = json.dumps(body).encode()
    delivery = await request_reply(
        conn, topic, payload, reply_topic=reply_topic, wait_seconds=wait_seconds, **options
    )
    if delivery is None:
        return None
    reply: dict[str, Any] = json.loads(delivery.payload)
    return reply


def max_packet_size(config: Config) -> int:
    """The largest packet the broker may send us.

    Requests up to four times `daemon.max_payload_bytes` still reach the
    router and get their 413 reply; the broker drops anything larger instead
    of making the daemon buffer it (4 MiB at least, so a small payload limit
    never starves the router of the packets it should refuse by name).
    """
    return max(4 * 1024 * 1024, 4 * config.daemon.max_payload_bytes)


def check_granted(subscriptions: Sequence[Subscription], granted: Sequence[int]) -> None:
    """A SUBACK can refuse a filter (ACL, shared subscriptions unsupported) or grant
    less QoS than asked (`max_qos 0`): then we are not ready.

    Every such filter is logged, then the first raises `SubscribeRefused`: the
    run loop retries with backoff and READY=1 is not sent, instead of serving
    while deaf to a topic (or taking requests at QoS 0, lost on any hiccup).
    """
    failed: SubscribeRefused | None = None
    for sub, code in zip(subscriptions, granted, strict=True):
        if code >= 0x80:
            reason = f"{reason_name(code)} (0x{code:02x})"
            log.error("mqtt.subscribe_refused", topic=sub.topic, reason=reason)
        elif code < sub.qos:
            log.error("mqtt.subscribe_downgraded", topic=sub.topic, asked=sub.qos, granted=code)
        else:
            continue
        failed = failed or SubscribeRefused(sub.topic, sub.qos, code)
    if failed is not None:
        raise failed
