"""Abuse: floods, junk and generated bodies never crash, stall or leak the daemon."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import LogCapture

from provisiond.config import Config
from provisiond.server import Server
from support import Broker, RpcClient, eventually, make_config, open_db, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

DOCUMENTED = {200, 400, 401, 403, 404, 409, 410, 413, 429, 503, 504}


async def test_flood_from_one_key_hits_rate_limit_others_unaffected(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    # A slow refill, so the counts hold however long 200 requests take here.
    config = make_config(tmp_path, broker, limits={"rate_per_key": 0.5, "burst_per_key": 30})
    _, noisy = seed_key(config)
    _, quiet = seed_key(config)
    async with running(config), RpcClient(config) as rpc:
        futures = [await rpc.send("keys/whoami", {}, key=noisy) for _ in range(200)]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
        statuses = [r["status"] for r in replies]
        assert 30 <= statuses.count(200) <= 40, statuses
        assert statuses.count(429) == 200 - statuses.count(200)
        assert {r["error"]["code"] for r in replies if r["status"] == 429} == {"rate_limited"}
        assert (await rpc.call("keys/whoami", {}, key=quiet))["status"] == 200
        await asyncio.sleep(2.5)  # the bucket refills at 0.5/s
        assert (await rpc.call("keys/whoami", {}, key=noisy))["status"] == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def field_bodies(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies that use the operation's own field names with arbitrary values, plus junk keys."""
    return st.dictionaries(
        st.sampled_from([*fields, "x", "token"]), json_values, max_size=len(fields) + 1
    )


def _rss_mb() -> float:
    """Resident memory now (not the peak, which earlier tests already raised)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


async def test_generated_bodies_for_every_operation_get_documented_answers(
    config: Config, daemon: Server, logs: LogCapture, heavy: bool
) -> None:
    """≥10k generated bodies with --heavy; a 1.5k quick variant otherwise."""
    assert daemon.router is not None
    ops = sorted(daemon.router.operations.items())
    _, key = seed_key(config, user=None)
    total = 10_000 if heavy else 1_500
    bodies: list[tuple[str, bytes]] = []

    fields = {name: list(op.body.model_fields) for name, op in ops}

    @settings(
        max_examples=total, database=None, deadline=None,
        suppress_health_check=list(HealthCheck), derandomize=True,
    )  # fmt: skip
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(fields)))
        body = data.draw(st.one_of(field_bodies(fields[name]), json_values))
        bodies.append((name, json.dumps(body).encode()))

    collect()
    # Raw junk too: not JSON, not UTF-8.
    bodies += [(name, os.urandom(64)) for name, _ in ops]
    assert len(bodies) >= total

    rss_before: float | None = None
    async with RpcClient(config) as rpc:
        statuses: dict[int, int] = {}
        for i in range(0, len(bodies), 200):
            batch = bodies[i : i + 200]
            futures = [await rpc.send(name, raw=raw, key=key) for name, raw in batch]
            for reply in await asyncio.wait_for(asyncio.gather(*futures), 60):
                statuses[reply["status"]] = statuses.get(reply["status"], 0) + 1
            if i == 400:
                gc.collect()
                rss_before = _rss_mb()
        assert set(statuses) <= DOCUMENTED, statuses
        assert statuses.get(400, 0) > len(bodies) // 2
        # Still serving, nothing left hanging.
        assert (await rpc.call("keys/whoami", {}, key=key))["status"] == 200
    # A request's task ends when the broker acknowledges its reply, which can
    # come just after the client has the reply itself.
    await eventually(lambda: daemon.router is not None and daemon.router.inflight == 0, 2)
    assert daemon.router.replays.in_progress == 0
    assert not [e for e in logs.entries if e["event"] == "rpc.internal_error"]
    if rss_before is not None:
        assert _rss_mb() - rss_before < 64, "memory grew while handling junk"


@pytest.mark.parametrize("size", [1, 256, 10_000])
async def test_correlation_and_reply_edge_cases(config: Config, rpc: RpcClient, size: int) -> None:
    _, key = seed_key(config)
    corr = uuid.uuid4().bytes[:1] * size
    reply = await rpc.call("keys/whoami", {}, key=key, correlation=corr)
    if size > 256:
        assert reply["status"] == 400 and reply["error"]["field"] == "correlation_id"
    else:
        assert reply["status"] == 200


async def test_junk_on_heartbeat_and_status_topics_is_counted_never_stored(
    config: Config, daemon: Server, logs: LogCapture, heavy: bool
) -> None:
    """100 MB of junk with --heavy (10 MB quick): random bytes, huge and tiny
    payloads, ids that are not ids, on the topics every device may publish to."""
    import random

    import aiomqtt

    total = (100 if heavy else 10) * 1024 * 1024
    rng = random.Random(7)
    prefix = config.mqtt.topic_prefix
    ids = ["1", "007", "-3", "abc", "99999999999999999999", "4294967296", "%00", "x" * 200]
    _, key = seed_key(config)
    gc.collect()
    rss_before = _rss_mb()
    sent = messages = 0
    async with aiomqtt.Client(
        "127.0.0.1", config.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        client.pending_calls_threshold = 1 << 30
        while sent < total:
            size = rng.choice([0, 1, 17, 4096, 5000, 65_536, 262_144])
            payload = rng.randbytes(size) if rng.random() < 0.7 else b"{" * size
            kind = rng.choice(["heartbeat", "heartbeat", "status"])
            await client.publish(f"{prefix}/devices/{rng.choice(ids)}/{kind}", payload, qos=0)
            sent += size + 1
            messages += 1
    async with RpcClient(config) as rpc:
        # Still answering, with the junk drained (the RPC waits behind it in the same session).
        reply = await rpc.call("daemon/stats", {}, key=key, timeout=120)
    assert reply["status"] == 200
    counters = reply["body"]["counters"]
    ignored = sum(
        v for k, v in counters.items() if k.startswith("presence.") and k != "presence.heartbeats"
    )
    seen = counters.get("presence.heartbeats", 0) + sum(
        v for k, v in counters.items() if k.startswith("presence.status.")
    )
    # The junk really reached the daemon (the test broker does not drop QoS 0 here).
    assert seen >= 0.95 * messages, (seen, messages)
    assert ignored > 0
    assert "presence.went_online" not in counters
    db = open_db(config)
    assert db.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM presence").fetchone()[0] == 0
    gc.collect()
    assert _rss_mb() - rss_before < 64, "memory grew while ingesting junk"


async def test_lone_surrogates_in_credentials_are_refused_not_crashes(
    config: Config, rpc: RpcClient, logs: LogCapture
) -> None:
    """JSON can carry a lone UTF-16 surrogate that no UTF-8 encoder accepts."""
    _, key = seed_key(config)
    surrogate_key = b'{"authorization": "Bearer sk_live_\\ud800"}'
    reply = await rpc.call("keys/whoami", raw=surrogate_key, correlation=uuid.uuid4().bytes)
    assert reply["status"] == 401, reply
    surrogate_token = (
        b'{"token": "\\ud800abc", "capabilities": 2,'
        b' "public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}'
    )
    for correlation in (uuid.uuid4().bytes, None):
        reply = await rpc.call("device/activate", raw=surrogate_token, correlation=correlation)
        assert reply["status"] in (400, 401), reply
    assert not [e for e in logs.entries if e["event"] == "rpc.internal_error"]
    assert (await rpc.call("keys/whoami", {}, key=key))["status"] == 200
