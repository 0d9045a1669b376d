"""Baseline: a bare responder that answers every request with a fixed 200 reply.

It does what the daemon's RPC path must do at the minimum (receive QoS 1,
publish a QoS 1 reply with the correlation data) and nothing else, so the
daemon's throughput divided by this one's is the cost of its own work.

`--client aiomqtt` (the default) is the baseline the goals are stated
against. `--client provisiond` is the same responder on the daemon's own
MQTT client (`provisiond.mqtt`): the floor of the daemon's transport, to
show what the router and the operation add on top of it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPLY = b'{"status":200,"body":{}}'


async def serve(port: int, topic: str) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:  # fmt: skip
        await client.subscribe(topic, qos=1)
        tasks: set[asyncio.Task[None]] = set()

        async def reply(message: aiomqtt.Message) -> None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = message.properties.CorrelationData  # type: ignore[union-attr]
            await client.publish(
                message.properties.ResponseTopic,  # type: ignore[union-attr]
                REPLY, qos=1, properties=props,
            )  # fmt: skip

        # One task per request, as the daemon does, so the baseline is not
        # held back by waiting for each PUBACK in turn.
        async for message in client.messages:
            task = asyncio.create_task(reply(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def serve_own_client(port: int, topic: str) -> None:
    from provisiond import mqtt

    async with mqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic, qos=1)
        tasks: set[asyncio.Task[None]] = set()

        async def reply(message: mqtt.Message) -> None:
            assert message.response_topic is not None
            await client.publish(
                message.response_topic, REPLY, qos=1,
                correlation_data=message.correlation_data, ack=message,
            )  # fmt: skip

        async for message in client.messages():
            task = asyncio.create_task(reply(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--client", choices=("aiomqtt", "provisiond"), default="aiomqtt")
    args = parser.parse_args()
    server = serve if args.client == "aiomqtt" else serve_own_client
    asyncio.run(server(args.port, args.topic))


if __name__ == "__main__":
    main()
