"""The backend-neutral MQTT boundary: what the daemon sends, receives and is refused.

Feature modules see only these types (through `provisiond.transport`); a
backend (`native`, `aiomqtt`) turns them into packets. This module imports
nothing from either backend, so the native client can raise the same
`PublishRefused` the features catch.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict, Unpack

# MQTT 5 reason codes (section 2.4) by value; the same table serves CONNACK,
# PUBACK, SUBACK and DISCONNECT, which share one numbering.
REASONS = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy",
    0x8A: "banned", 0x8B: "server shutting down", 0x8C: "bad authentication method",
    0x8D: "keep alive timeout", 0x8E: "session taken over", 0x8F: "topic filter invalid",
    0x90: "topic name invalid", 0x91: "packet identifier in use",
    0x92: "packet identifier not found", 0x93: "receive maximum exceeded",
    0x94: "topic alias invalid", 0x95: "packet too large", 0x96: "message rate too high",
    0x97: "quota exceeded", 0x98: "administrative action", 0x99: "payload format invalid",
    0x9A: "retain not supported", 0x9B: "QoS not supported", 0x9C: "use another server",
    0x9D: "server moved", 0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded", 0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}  # fmt: skip

# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
V311_RETURN_CODES = {
    0: "accepted", 1: "unacceptable protocol version", 2: "identifier rejected",
    3: "server unavailable", 4: "bad user name or password", 5: "not authorized",
}  # fmt: skip


def reason_name(code: int) -> str:
    return REASONS.get(code, "refused" if code >= 0x80 else "success")


# --------------------------------------------------------------------- errors


class TransportError(Exception):
    """Any failure of the broker connection or of a request on it."""


class NotConnected(TransportError):
    """Publishing failed because the broker connection is down (or went down meanwhile)."""


class ConnectionLost(NotConnected):
    """The connection ended; the message says why."""


class PublishRefused(TransportError):
    """The broker answered a publish with a reason code >= 0x80, or would have
    (too large, QoS or retain it does not support): not a lost link, no retry."""

    def __init__(self, topic: str, reason_code: int, reason_string: str | None = None) -> None:
        self.topic = topic
        self.reason_code = reason_code
        self.reason = reason_name(reason_code)
        self.reason_string = reason_string
        detail = f": {reason_string}" if reason_string else ""
        super().__init__(
            f"broker refused the publish to {topic!r}: {self.reason} (0x{reason_code:02x}){detail}"
        )


class ConnectRefused(TransportError):
    """The broker's CONNACK said no. `reason_string` and `server_reference` are the
    broker's own words, when it sent any."""

    def __init__(
        self,
        reason_code: int,
        *,
        reason_string: str | None = None,
        server_reference: str | None = None,
    ) -> None:
        self.reason_code = reason_code
        self.reason = reason_name(reason_code)
        self.reason_string = reason_string
        self.server_reference = server_reference
        text = f"broker refused the connection: {self.reason} (0x{reason_code:02x})"
        if reason_string:
            text += f": {reason_string}"
        if server_reference:
            text += f"; it points to {server_reference}"
        super().__init__(text)


class BrokerNotMqtt5(ConnectRefused):
    """The broker answered in MQTT 3.1.1 (a 2-byte CONNACK) or said 0x84: it does
    not speak MQTT 5, which the daemon needs (response topics, correlation data,
    manual acks of a persistent session)."""

    def __init__(self, return_code: int | None = None, *, hung_up: bool = False) -> None:
        super().__init__(0x84)
        self.return_code = return_code
        self.hung_up = hung_up
        v311 = f"{V311_RETURN_CODES.get(return_code or 0, 'refused')}, return code {return_code}"
        if return_code is None:
            answer = "refused the protocol version (0x84)"
        elif hung_up:
            answer = (
                "closed the connection at our MQTT 5 CONNECT without an answer, "
                f"and answers MQTT 3.1.1 ({v311})"
            )
        else:
            answer = f"answered with an MQTT 3.1.1 CONNACK ({v311})"
        self.args = (
            f"the broker does not speak MQTT 5: it {answer}; enable MQTT 5 on its listener "
            "or use a broker that supports it",
        )


class SubscribeRefused(TransportError):
    """A SUBACK refused a filter, or granted less QoS than asked: the daemon would be deaf
    (or lose requests), so it is not ready."""

    def __init__(self, topic: str, asked: int, granted: int) -> None:
        self.topic = topic
        self.asked = asked
        self.granted = granted
        if granted >= 0x80:
            text = f"broker refused the subscription to {topic}: {reason_name(granted)} (0x{granted:02x})"
        else:
            text = (
                f"broker downgraded the subscription to {topic} from QoS {asked} to QoS {granted}"
            )
        super().__init__(text)


class BrokerUnsuitable(TransportError):
    """The broker connected but announced a limit the daemon cannot work with."""


# --------------------------------------------------------------------- values


class PacketOptions(TypedDict, total=False):
    """A publish's optional parts that go into the PUBLISH packet, passed on unchanged
    from the transport through a backend to the native client's own keywords (which
    mypy holds this to); each layer reads only those it acts on, and a missing key
    means the client's default (QoS 0 below the transport, which defaults to 1)."""

    qos: int
    retain: bool
    correlation_data: bytes | None
    response_topic: str | None
    user_properties: Sequence[tuple[str, str]]
    message_expiry: int | None


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Everything needed to open one connection, whichever backend opens it."""

    host: str
    port: int = 1883
    client_id: str = ""
    clean_start: bool = True
    keepalive: int = 60
    session_expiry: int = 0
    receive_maximum: int = 65535
    maximum_packet_size: int = 0
    will: Will | None = None
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """The broker's CONNACK, normalised. `None`: the backend cannot see it."""

    session_present: bool | None
    session_expiry: int | None = None
    receive_maximum: int | None = None
    maximum_qos: int | None = None
    retain_available: bool | None = None
    maximum_packet_size: int | None = None
    server_keepalive: int | None = None
    assigned_client_id: str | None = None
    reason_string: str | None = None
    wildcard_available: bool | None = None
    shared_available: bool | None = None


# Subscription options (MQTT 5, 3.8.3.1): Retain Handling.
SEND_RETAINED = 0  # at every SUBSCRIBE, even one that only repeats the subscription
SEND_RETAINED_IF_NEW = 1  # only when the subscription did not exist in the session
NO_RETAINED = 2


@dataclass(frozen=True, slots=True)
class Subscription:
    topic: str
    qos: int = 1
    # A subscription the session already holds gets no retained copies again:
    # on a reconnect that re-subscribes, 100k retained statuses would come back.
    retain_handling: int = SEND_RETAINED_IF_NEW


@dataclass(slots=True, eq=False)
class Delivery:
    """A received message and the connection it came on (acks go to that one only).

    `handle` is the backend's own message (what its ack needs); features never
    look at it.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    connection: int
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: Sequence[tuple[str, str]] = ()
    content_type: str | None = None
    dup: bool = False
    handle: object = None


class PublishOptions(PacketOptions, total=False):
    """A publish's options at the boundary: the packet's, and `ack`, a delivery to
    acknowledge in the same write (see mqtt.Client.publish)."""

    ack: Delivery | None


class Connection(Protocol):
    """One broker connection as a backend provides it."""

    session: SessionInfo
    dropped: int

    async def connect(self) -> SessionInfo: ...

    async def disconnect(self, *, with_will: bool = False) -> None:
        """A clean DISCONNECT; `with_will`: reason 0x04, the broker publishes the will
        all the same (what a device losing power looks like, for simulators)."""
        ...

    @property
    def is_connected(self) -> bool: ...

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> list[int]:
        """All filters in one SUBSCRIBE; the granted QoS (or reason code) of each."""
        ...

    async def publish(self, topic: str, payload: bytes, **options: Unpack[PublishOptions]) -> None:
        """`options`: the packet's, and `ack`, a delivery to acknowledge with it."""
        ...

    def ack(self, delivery: Delivery) -> None: ...

    def deliveries(self) -> AsyncIterator[Delivery]:
        """Received messages in order; raises a `TransportError` once the connection ends."""
        ...


class Backend(Protocol):
    name: str
    # What the backend can do; the transport adapts (and the docs list it).
    fused_ack: bool
    sees_refusals: bool

    def connection(self, options: ConnectOptions, number: int) -> Connection: ...
