"""The daemon's own MQTT 5 client (see `client` for why it is not aiomqtt).

Its errors are the transport boundary's (`provisiond.backends.types`),
re-exported here under the names the client has always used.
"""

from provisiond.backends.types import (
    BrokerNotMqtt5,
    ConnectionLost,
    ConnectRefused,
    PublishRefused,
    Will,
)
from provisiond.mqtt.client import Client, MqttError
from provisiond.mqtt.codec import ConnAck, Message, ProtocolError

__all__ = [
    "BrokerNotMqtt5",
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
