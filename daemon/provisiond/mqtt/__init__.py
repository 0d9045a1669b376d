"""The daemon's own MQTT 5 client (see `client` for why it is not aiomqtt)."""

from provisiond.mqtt.client import (
    Client,
    ConnectionLost,
    ConnectRefused,
    MqttError,
    PublishRefused,
)
from provisiond.mqtt.codec import ConnAck, Message, ProtocolError, Will

__all__ = [
    "Client",
    "ConnAck",
    "ConnectRefused",
    "ConnectionLost",
    "Message",
    "MqttError",
    "ProtocolError",
    "PublishRefused",
    "Will",
]
