"""Two daemons on one store (docs/scaling.md): a request both receive is done once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from provision_support import activate, org_key, provision, rows
from structlog.testing import LogCapture

from support import Broker, RpcClient, make_config, open_db, remember_secret, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store


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


async def test_single_winners_across_two_daemons_on_one_store(
    tmp_path: Path, broker: Broker
) -> None:
    """Concurrent re-provisions and activations of one token, split between two
    daemons sharing a store: one live token, one activation (SQLite's write
    lock; on PostgreSQL the store's advisory write lock)."""
    first = make_config(tmp_path, broker)
    second = first.model_copy(
        update={
            "mqtt": first.mqtt.model_copy(
                update={
                    "client_id": first.mqtt.client_id + "-b",
                    "topic_prefix": first.mqtt.topic_prefix + "b",
                }
            )
        }
    )
    key = org_key(first)
    async with running(first), running(second), RpcClient(first) as a, RpcClient(second) as b:
        _, device_id = await provision(a, key)
        futures = [
            await rpc.send("provision/reprovision/token", {"deviceId": device_id}, key=key)
            for _ in range(10)
            for rpc in (a, b)
        ]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert all(r["status"] == 200 for r in replies), replies
        issued = {remember_secret(r["body"]["token"]) for r in replies}
        live = rows(
            first,
            "SELECT hash FROM provision_tokens WHERE device_id = ? AND used_at IS NULL"
            " AND revoked_at IS NULL",
            (device_id,),
        )
        assert len(issued) == 20 and len(live) == 1
        (winner,) = [t for t in issued if hashlib.sha256(t.encode()).hexdigest() == live[0][0]]
        # The live token, activated through both daemons at once, many times.
        results = await asyncio.gather(*(activate(rpc, winner) for _ in range(5) for rpc in (a, b)))
    statuses = [r["status"] for r in results]
    assert statuses.count(200) == 1, statuses
    assert {r["error"]["code"] for r in results if r["status"] != 200} == {"token_used"}, results
