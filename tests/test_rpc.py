"""The RPC path end to end over a real mosquitto (docs/protocol.md §2)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import LogCapture

from provisiond.config import Config
from provisiond.server import Server
from support import Broker, RpcClient, eventually, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store


async def test_whoami_over_mosquitto_rr_v5(config: Config, daemon: Server) -> None:
    key_id, secret = seed_key(config, scopes=("devices:read",))
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_rr", "-V", "5", "-h", "127.0.0.1", "-p", str(config.mqtt.port),
        "-t", f"{config.mqtt.topic_prefix}/rpc/keys/whoami",
        "-e", f"replies-{uuid.uuid4().hex}",
        "-D", "PUBLISH", "user-property", "authorization", f"Bearer {secret}",
        "-m", "{}", "-W", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    reply = json.loads(out)
    assert reply["status"] == 200
    assert reply["body"] == {
        "key_id": key_id, "org_id": 1, "user_id": None, "scopes": ["devices:read"], "permissions": [],
    }  # fmt: skip


async def test_whoami_over_mqtt311_body_keys(config: Config, daemon: Server) -> None:
    key_id, secret = seed_key(config)
    reply_topic = f"replies-{uuid.uuid4().hex}"
    got: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        loop.call_soon_threadsafe(got.set_result, json.loads(msg.payload))

    subscribed = asyncio.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *a: loop.call_soon_threadsafe(subscribed.set)
    client.connect("127.0.0.1", config.mqtt.port)
    client.loop_start()
    try:
        client.subscribe(reply_topic, qos=1)
        await asyncio.wait_for(subscribed.wait(), 5)
        body = {
            "reply_to": reply_topic,
            "correlation_id": "abc-1",
            "authorization": f"Bearer {secret}",
        }
        client.publish(f"{config.mqtt.topic_prefix}/rpc/keys/whoami", json.dumps(body), qos=1)
        reply = await asyncio.wait_for(got, 10)
    finally:
        client.loop_stop()
        client.disconnect()
    assert reply["status"] == 200
    assert reply["correlation_id"] == "abc-1"
    assert reply["body"]["key_id"] == key_id  # type: ignore[index]


async def test_bad_input_each_gets_its_answer_and_daemon_keeps_serving(
    config: Config, rpc: RpcClient, logs: LogCapture
) -> None:
    key_id, secret = seed_key(config)
    reply = await rpc.call("keys/whoami", raw=b"{not json", key=secret)
    assert reply["status"] == 400 and reply["error"]["code"] == "invalid_json"
    reply = await rpc.call("keys/whoami", raw=b"[1, 2]", key=secret)
    assert reply["status"] == 400 and reply["error"]["code"] == "invalid_body"
    reply = await rpc.call("keys/whoami", raw=b"\xff\xfe\x00", key=secret)
    assert reply["status"] == 400
    # Nested deeper than the parser recurses: still a plain 400, not a lost request.
    reply = await rpc.call("keys/whoami", raw=b"[" * 60_000, key=secret)
    assert reply["status"] == 400 and reply["error"]["code"] == "invalid_json"
    reply = await rpc.call("keys/whoami", raw=b"x" * (1024 * 1024), key=secret)
    assert reply["status"] == 413
    reply = await rpc.call("keys/whoami", {})
    assert reply["status"] == 401
    reply = await rpc.call("keys/whoami", {}, key="sk_live_" + "A" * 40)
    assert reply["status"] == 401
    reply = await rpc.call("keys/whoami", {"surprise": 1}, key=secret)
    assert reply["status"] == 400 and reply["error"]["field"] == "surprise"
    reply = await rpc.call("no/such/op", {}, key=secret)
    assert reply["status"] == 404 and reply["error"]["code"] == "unknown_operation"

    # No reply path: nothing to answer, so a log line says it was dropped.
    await rpc.send("keys/whoami", {}, key=secret, reply=False)
    # A reply topic aimed at the daemon's own command space is refused, not used.
    async with RpcClient(config) as spy:
        await spy.client.subscribe(f"{config.mqtt.topic_prefix}/devices/1/commands/#")
        rpc.reply_topic_backup = rpc.reply_topic  # type: ignore[attr-defined]
        rpc.reply_topic = f"{config.mqtt.topic_prefix}/devices/1/commands/reconfigure"
        await rpc.send("keys/whoami", {}, key=secret)
        rpc.reply_topic = rpc.reply_topic_backup  # type: ignore[attr-defined]
        reply = await rpc.call("keys/whoami", {}, key=secret)
        assert reply["status"] == 200, "daemon still serving after bad input"
        assert spy.unmatched == []
    await eventually(lambda: len([e for e in logs.entries if e["event"] == "rpc.dropped"]) >= 2)
    dropped = [e for e in logs.entries if e["event"] == "rpc.dropped"]
    assert len(dropped) == 2
    assert any("reply_topic_refused" in e for e in dropped)

    # Revoked keys stop working at once.
    from provisiond import auth
    from support import open_db

    auth.revoke_key(open_db(config), key_id)
    # The daemon notices the CLI's change within its key-poll interval (0.2 s).
    loop = asyncio.get_running_loop()
    revoked_at = loop.time()
    while (await rpc.call("keys/whoami", {}, key=secret))["status"] != 401:
        assert loop.time() - revoked_at < 3.0, "revocation not effective within 3 s"
        await asyncio.sleep(0.02)


async def test_scope_is_enforced(config: Config, rpc: RpcClient) -> None:
    _, secret = seed_key(config, scopes=("devices:read",))
    reply = await rpc.call("daemon/stats", {}, key=secret)
    assert reply["status"] == 403 and reply["error"]["code"] == "missing_scope"
    _, secret = seed_key(config, scopes=("daemon:read",))
    reply = await rpc.call("daemon/stats", {}, key=secret)
    assert reply["status"] == 200 and reply["body"]["connected"] is True


async def test_same_correlation_twice_gets_identical_reply_once_logged_as_replay(
    config: Config, rpc: RpcClient, logs: LogCapture
) -> None:
    _, secret = seed_key(config)
    corr = b"corr-" + uuid.uuid4().bytes
    first = await rpc.call("keys/whoami", {}, key=secret, correlation=corr)
    second = await rpc.call("keys/whoami", {}, key=secret, correlation=corr)
    assert first == second and first["status"] == 200

    def lines() -> list[dict[str, object]]:
        return [e for e in logs.entries if e["event"] == "rpc" and e.get("op") == "keys/whoami"]

    await eventually(lambda: len(lines()) >= 2)
    await asyncio.sleep(0.1)
    assert len(lines()) == 2
    assert [bool(e.get("replay")) for e in lines()] == [False, True]


async def test_request_published_while_daemon_is_down_is_answered_after_start(
    config: Config, logs: LogCapture
) -> None:
    from support import running

    _, secret = seed_key(config)
    async with running(config):
        pass  # first run creates the persistent session and its subscriptions
    async with RpcClient(config) as rpc:
        fut = await rpc.send("keys/whoami", {}, key=secret)
        await asyncio.sleep(0.3)
        assert not fut.done()
        async with running(config):
            reply = await asyncio.wait_for(fut, 10)
    assert reply["status"] == 200


async def test_reconnects_after_broker_restart(tmp_path, own_broker, logs: LogCapture) -> None:  # type: ignore[no-untyped-def]
    from support import make_config, running

    config = make_config(tmp_path, own_broker)
    _, secret = seed_key(config)
    async with running(config) as server:
        own_broker.stop()
        # The broker saved the daemon's session on the way down, so the restart
        # below tests a resumed session, not a new one.
        assert own_broker.persisted(), own_broker.log.read_text()[-1000:]
        await asyncio.sleep(0.5)
        own_broker.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not server.app.transport.is_connected:  # type: ignore[union-attr]
            assert loop.time() < deadline, "daemon did not reconnect"
            await asyncio.sleep(0.05)
        async with RpcClient(config) as rpc:
            reply = await rpc.call("keys/whoami", {}, key=secret)
        assert reply["status"] == 200
        assert server.app.transport.connections == 2  # type: ignore[union-attr]
    connected = [e for e in logs.entries if e["event"] == "mqtt.connected"]
    assert [e["session_present"] for e in connected] == [False, True]
    assert [e["resubscribed"] for e in connected] == [True, False]


async def test_no_api_key_in_any_log_line(config: Config, rpc: RpcClient, logs: LogCapture) -> None:
    _, secret = seed_key(config)
    await rpc.call("keys/whoami", {}, key=secret)
    await rpc.call("keys/whoami", raw=b"{bad", key=secret)
    await rpc.call("keys/whoami", {"authorization": f"Bearer {secret}", "x": secret}, key=secret)
    await rpc.call("keys/whoami", {}, key=secret[:-1] + "Z")
    assert logs.entries
    assert secret not in repr(logs.entries)
    assert secret[8:] not in repr(logs.entries)


def test_check_config_names_the_typo(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.toml"
    path.write_text('[mqtt]\nhots = "localhost"\n')
    proc = subprocess.run(
        ["python", "-m", "provisiond", "check-config", "-c", str(path)],
        capture_output=True, text=True, env=_env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "mqtt.hots" in proc.stderr


def _env() -> dict[str, str]:
    import os
    import sys
    from pathlib import Path

    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root / 'daemon'}:{root / 'plugins'}"
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


async def test_bad_reply_topics_never_get_an_answer_nor_jam_the_daemon(
    tmp_path,
    broker,
    logs: LogCapture,  # type: ignore[no-untyped-def]
) -> None:
    """Wildcards or the daemon's own device topics as Response Topic, with a body
    that fails early: refused before any reply, acknowledged, daemon still serving."""
    from support import make_config, running

    # A small in-flight window: a few unacknowledged messages would stall delivery.
    config = make_config(tmp_path, broker, mqtt={"receive_maximum": 10})
    _, secret = seed_key(config)
    prefix = config.mqtt.topic_prefix
    async with running(config), RpcClient(config) as rpc:
        await rpc.client.subscribe(f"{prefix}/devices/#", qos=1)
        for topic in ("evil/+/x", "evil/#", f"{prefix}/devices/5/heartbeat"):
            rpc.reply_topic, saved = topic, rpc.reply_topic
            for raw in (b"{", b"x" * (1024 * 1024), b"[1]"):
                for _ in range(10):
                    await rpc.send("keys/whoami", raw=raw)
            rpc.reply_topic = saved
        reply = await rpc.call("keys/whoami", {}, key=secret)
        assert reply["status"] == 200
        # Nothing was published on the device's topic in the daemon's name.
        assert not [u for u in rpc.unmatched if "status" in u]
    await eventually(lambda: len([e for e in logs.entries if e.get("reply_topic_refused")]) >= 90)


async def test_a_request_beyond_the_packet_limit_never_reaches_the_daemon(
    config: Config, rpc: RpcClient, daemon: Server
) -> None:
    """Up to 4x max_payload_bytes (at least 4 MiB) a request gets its 413; beyond
    that the broker drops it, as the daemon's MQTT Maximum Packet Size asks."""
    _key_id, secret = seed_key(config)
    assert daemon.app is not None
    before = daemon.app.counters["rpc.requests"]
    future = await rpc.send("keys/whoami", raw=b"x" * (5 * 1024 * 1024), key=secret)
    reply = await rpc.call("keys/whoami", raw=b"x" * (3 * 1024 * 1024), key=secret)
    assert reply["status"] == 413
    await asyncio.sleep(0.5)
    assert not future.done()  # never answered: the daemon never received it
    assert daemon.app.counters["rpc.requests"] == before + 1
    assert (await rpc.call("keys/whoami", {}, key=secret))["status"] == 200


async def test_a_reply_topic_the_broker_would_refuse_is_never_used(
    config: Config, daemon: Server, logs: LogCapture
) -> None:
    """mosquitto disconnects a client publishing to a topic with control characters:
    one such request, redelivered after each reconnect, would keep the daemon
    reconnecting forever. It is refused before any reply, and acknowledged."""
    import aiomqtt

    assert daemon.app is not None
    connections = daemon.app.transport.connections
    prefix = config.mqtt.topic_prefix
    bad = ["r/\u0001x", "r/\x00", "r/\ud800", "r/\ufffe", "r/\U0001ffff", "$SYS/x"]
    async with aiomqtt.Client(
        "127.0.0.1", config.mqtt.port, protocol=aiomqtt.ProtocolVersion.V311
    ) as client:
        for i, topic in enumerate(bad):
            body = json.dumps({"reply_to": topic, "correlation_id": str(i)})
            await client.publish(f"{prefix}/rpc/device/list", body.encode(), qos=1)

    def refused() -> list[dict[str, object]]:
        return [
            e for e in logs.entries if e["event"] == "rpc.dropped" and e.get("reply_topic_refused")
        ]

    await eventually(lambda: len(refused()) == len(bad))
    await asyncio.sleep(1)  # a refused publish would have dropped the connection by now
    assert daemon.app.transport.connections == connections
    assert len(refused()) == len(bad)


async def test_a_dropped_request_is_logged_as_dropped_not_as_a_server_error(
    config: Config, rpc: RpcClient, daemon: Server, logs: LogCapture
) -> None:
    _key_id, secret = seed_key(config)
    await rpc.send("keys/whoami", {}, key=secret, reply=False)  # no reply path at all
    await eventually(lambda: [e for e in logs.entries if e["event"] == "rpc"])
    [line] = [e for e in logs.entries if e["event"] == "rpc"]
    assert line["status"] == "dropped"
    assert daemon.app is not None and daemon.app.counters["rpc.status.500"] == 0


async def test_per_key_reply_topics_answer_only_on_the_keys_own_topic(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    config = make_config(tmp_path, broker, daemon={"reply_topics": "per-key"})
    key_id, secret = seed_key(config)
    other_id, other = seed_key(config)
    prefix = config.mqtt.topic_prefix
    own = RpcClient(config)
    own.reply_topic = f"{prefix}/replies/{key_id}/svc-1"
    async with running(config) as server, own, RpcClient(config) as anywhere:
        assert (await own.call("keys/whoami", {}, key=secret))["status"] == 200
        # Another key's topic, a topic outside replies/, an unknown key: no reply at all.
        silent = [
            await own.send("keys/whoami", {}, key=other),
            await own.send("keys/whoami", {}, key="sk_live_" + "x" * 40),
            await anywhere.send("keys/whoami", {}, key=secret),
        ]
        done, _ = await asyncio.wait(silent, timeout=1.5)
        assert not done
        assert server.app is not None
        assert server.app.counters["rpc.dropped"] == 3
    dropped = [e for e in logs.entries if e["event"] == "rpc.dropped"]
    assert len(dropped) == 3 and all("not the key's own" in e["reason"] for e in dropped)
    assert other_id != key_id
