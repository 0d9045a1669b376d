"""Baseline: a bare aiomqtt responder that echoes a fixed 200 reply.

It does what the daemon's RPC path must do at the minimum (receive QoS 1,
publish a QoS 1 reply with the correlation data) and nothing else, so the
daemon's throughput divided by this one's is the cost of its own work.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.topic))


if __name__ == "__main__":
    main()
