"""Two daemons on one store (docs/scaling.md): a request both receive is done once."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import LogCapture

from support import Broker, make_config, open_db, remember_secret, running, seed_key


async def test_a_request_delivered_to_two_daemons_creates_one_device(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    """Without a shared subscription both daemons receive every request: the worst
    case of a redelivery landing on another process. The reply recorded in the
    same transaction as the device decides which one did the work."""
    first = make_config(tmp_path, broker)
    second = first.model_copy(
        update={"mqtt": first.mqtt.model_copy(update={"client_id": first.mqtt.client_id + "-b"})}
    )
    _, key = seed_key(first, users=(1,))
    n = 20
    replies: dict[bytes, list[dict[str, object]]] = {}
    async with (
        running(first),
        running(second),
        aiomqtt.Client("127.0.0.1", first.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5) as client,
    ):
        reply_topic = f"replies-{uuid.uuid4().hex}"
        await client.subscribe(reply_topic, qos=1)
        for _ in range(n):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = uuid.uuid4().bytes
            props.UserProperty = ("authorization", f"Bearer {key}")
            await client.publish(
                f"{first.mqtt.topic_prefix}/rpc/provision/token",
                json.dumps({"orgId": 1, "ownerId": 1}).encode(),
                qos=1,
                properties=props,
            )

        async def collect() -> None:
            async for message in client.messages:
                corr = bytes(message.properties.CorrelationData)  # type: ignore[union-attr]
                reply = json.loads(message.payload)  # type: ignore[arg-type]
                remember_secret(reply["body"]["token"])
                replies.setdefault(corr, []).append(reply)
                if sum(len(r) for r in replies.values()) == 2 * n:
                    return

        await asyncio.wait_for(collect(), 30)
    assert len(replies) == n
    for answers in replies.values():
        # Both daemons answered, with the same device and the same token.
        assert len(answers) == 2 and answers[0] == answers[1] and answers[0]["status"] == 200
    # One daemon did the work; the other answered with its recorded reply.
    lines = [e for e in logs.entries if e["event"] == "rpc" and e.get("op") == "provision/token"]
    assert len(lines) == 2 * n
    assert sum(1 for e in lines if e.get("replay")) == n
    db = open_db(first)
    assert db.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == n
    assert db.execute("SELECT COUNT(*) FROM provision_tokens").fetchone()[0] == n
