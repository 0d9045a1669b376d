"""Three daemons, one fleet (docs/scaling.md, "Several daemons"): real processes
sharing one store (SQLite here, PostgreSQL with `--store postgresql`) and one
mosquitto, with `[mqtt] shared_group` set, so each request and each device
message reaches one of them. The leader is killed with SIGKILL mid-run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import aiomqtt
import pytest
from daemon_proc import ROOT, DaemonProcess, daemon_process, provisiond, write_toml
from presence_support import FakeDevice, seed_devices
from test_docs import blocks

from provisiond.config import Config
from support import Broker, RpcClient, eventually, make_config, rows, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

DEVICES = 1000
INTERVAL = 1.0  # each device's heartbeat interval (the hint it sends)
FACTOR = 2.0  # its deadline: INTERVAL * FACTOR after its last heartbeat


def node_configs(tmp_path: Path, broker: Broker, n: int = 3) -> list[Config]:
    """`n` daemons of one group: own client id and state directory, one store."""
    base = make_config(
        tmp_path,
        broker,
        mqtt={"shared_group": "fleet"},
        presence={"min_interval_seconds": 0.5, "timeout_factor": FACTOR},
        log={"level": "info"},
    )
    configs = []
    for i in range(n):
        state = tmp_path / f"node{i}"
        state.mkdir()
        store = base.store
        if store.url:  # PostgreSQL: nothing shared on disk between the nodes
            store = store.model_copy(update={"path": str(state / "store.db")})
        configs.append(
            base.model_copy(
                update={
                    "mqtt": base.mqtt.model_copy(
                        update={"client_id": f"{base.mqtt.client_id}-{i}"}
                    ),
                    "store": store,
                }
            )
        )
    return configs


@contextlib.asynccontextmanager
async def nodes(tmp_path: Path, configs: list[Config]) -> AsyncIterator[list[DaemonProcess]]:
    async with contextlib.AsyncExitStack() as stack:
        procs = []
        for i, config in enumerate(configs):
            toml = write_toml(config, tmp_path / f"node{i}" / "provisiond.toml")
            procs.append(await stack.enter_async_context(daemon_process(toml)))
        for i, proc in enumerate(procs):
            try:
                await proc.wait_event("daemon.ready", timeout=30)
            except TimeoutError:
                raise AssertionError(f"node{i} not ready:\n{proc.tail()}") from None
        yield procs


async def leader_of(procs: list[DaemonProcess]) -> DaemonProcess:
    """The node that says it was elected (exactly one may say so)."""
    async with asyncio.timeout(10):
        while True:
            elected = [p for p in procs if p.named("cluster.elected")]
            if elected:
                assert len(elected) == 1, "two leaders at once"
                return elected[0]
            await asyncio.sleep(0.05)


class PresenceLog:
    """Every presence document published, with the wall-clock time it arrived."""

    def __init__(self, config: Config) -> None:
        self.prefix = config.mqtt.topic_prefix
        self.client = aiomqtt.Client(
            "127.0.0.1",
            config.mqtt.port,
            identifier=f"watch-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        self.seen: dict[int, list[tuple[bool, float]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PresenceLog:
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.prefix}/devices/+/presence", qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for message in self.client.messages:
            device_id = int(str(message.topic).split("/")[-2])
            doc = json.loads(message.payload)  # type: ignore[arg-type]
            self.seen.setdefault(device_id, []).append((doc["online"], time.time()))

    def count(self, online: bool) -> dict[int, int]:
        return {d: sum(1 for o, _ in s if o is online) for d, s in self.seen.items()}

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await self.client.__aexit__(None, None, None)


class Fleet:
    """`DEVICES` devices heartbeating through one connection, as a gateway's LAN would."""

    def __init__(self, config: Config, ids: list[int]) -> None:
        self.prefix = config.mqtt.topic_prefix
        self.ids = ids
        self.client = aiomqtt.Client(
            "127.0.0.1", config.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5
        )
        self.last_sent: dict[int, float] = {}

    async def round(self) -> None:
        body = json.dumps({"interval": INTERVAL}).encode()
        for device_id in self.ids:
            self.last_sent[device_id] = time.time()
            await self.client.publish(f"{self.prefix}/devices/{device_id}/heartbeat", body, qos=0)

    async def beat_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            await self.round()
            await asyncio.sleep(max(0.0, INTERVAL / 2 - (time.monotonic() - started)))


async def test_presence_with_three_daemons_and_the_leader_killed(
    tmp_path: Path, broker: Broker
) -> None:
    """1k heartbeating devices over three daemons: each online and each offline is
    published exactly once, offlines at most 1 s after their deadline, although
    the leader is killed with SIGKILL while the devices heartbeat."""
    configs = node_configs(tmp_path, broker)
    ids = list(range(1, DEVICES + 1))
    seed_devices(configs[0], ids)
    fleet = Fleet(configs[0], ids)
    async with (
        nodes(tmp_path, configs) as procs,
        PresenceLog(configs[0]) as published,
        fleet.client,
    ):
        leader = await leader_of(procs)
        await fleet.beat_for(2.0)
        await eventually(lambda: len(published.count(True)) == DEVICES, timeout=10)

        leader.signal(signal.SIGKILL)
        await leader.wait(10)
        # Heartbeats go on through the takeover: nobody may be declared offline.
        await fleet.beat_for(4.0)
        survivors = [p for p in procs if p is not leader]
        assert sum(1 for p in survivors if p.named("cluster.elected")) == 1
        assert not any(published.count(False).values()), "a heartbeating device went offline"

        # The fleet falls silent: every device goes offline, once, on time.
        stopped = time.time()
        deadlines = {d: sent + INTERVAL * FACTOR for d, sent in fleet.last_sent.items()}
        await eventually(
            lambda: sum(published.count(False).values()) >= DEVICES,
            timeout=INTERVAL * FACTOR + 10,
        )
        await asyncio.sleep(1.5)  # time for a duplicate to show

    assert published.count(True) == dict.fromkeys(ids, 1)
    assert published.count(False) == dict.fromkeys(ids, 1)
    lateness = [
        at - deadlines[d] for d, seen in published.seen.items() for online, at in seen if not online
    ]
    assert all(at >= stopped for d, s in published.seen.items() for o, at in s if not o)
    assert max(lateness) <= 1.0, f"latest offline {max(lateness):.2f} s after its deadline"


async def reconfigure(rpc: RpcClient, key: str, device_id: int) -> str:
    reply = await rpc.call("provision/reconfigure", {"deviceId": device_id}, key=key)
    assert reply["status"] == 200, reply
    return str(reply["body"]["commandId"])


async def test_a_queued_reconfigure_is_delivered_exactly_once_across_a_leader_kill(
    tmp_path: Path, broker: Broker
) -> None:
    """Commands queued for offline devices through any daemon are published once
    each when the device comes online, by the leader — the new one when the old
    was killed after the commands were queued."""
    configs = node_configs(tmp_path, broker)
    ids = [101, 102, 103, 104, 105, 106]
    seed_devices(configs[0], ids)
    _, key = seed_key(configs[0])
    async with nodes(tmp_path, configs) as procs, RpcClient(configs[0]) as rpc:
        leader = await leader_of(procs)
        command_ids = {d: await reconfigure(rpc, key, d) for d in ids}
        leader.signal(signal.SIGKILL)
        await leader.wait(10)
        async with contextlib.AsyncExitStack() as stack:
            devices = [await stack.enter_async_context(FakeDevice(configs[0], d)) for d in ids]
            for _ in range(8):
                for device in devices:
                    await device.heartbeat({"interval": INTERVAL})
                await asyncio.sleep(0.5)
            await eventually(lambda: all(device.commands for device in devices), timeout=10)
            await asyncio.sleep(2.0)  # a second copy would arrive by now
            for device in devices:
                assert [c["id"] for c in device.commands] == [command_ids[device.device_id]]
    states = rows(configs[0], "SELECT state FROM commands ORDER BY id")
    assert [s for (s,) in states] == ["sent"] * len(ids)


async def test_each_request_is_served_once_by_the_group(tmp_path: Path, broker: Broker) -> None:
    """`$share` hands each request to one daemon: 60 provisions make 60 devices,
    and every daemon of the group served some of them."""
    configs = node_configs(tmp_path, broker)
    _, key = seed_key(configs[0], users=(1,))
    async with nodes(tmp_path, configs) as procs, RpcClient(configs[0]) as rpc:
        replies = await asyncio.gather(
            *(rpc.call("provision/token", {"orgId": 1, "ownerId": 1}, key=key) for _ in range(60))
        )
        assert all(r["status"] == 200 for r in replies)
        served = [len(p.named("rpc")) for p in procs]
    assert rows(configs[0], "SELECT COUNT(*) FROM devices") == [(60,)]
    assert all(n > 0 for n in served), served


async def test_the_three_node_example_runs_as_written(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/scaling.md's worked example: its SQL sets up the database, and its node
    config, pointed at this test's broker and cluster, starts a daemon of the group
    that leads it (`provisiond call daemon/stats` shows it)."""
    import pg_cluster

    doc = (ROOT / "docs" / "scaling.md").read_text()
    example = doc[doc.index("## Worked example: three nodes") :]
    sql = blocks(example, "sql")[0]
    node = tomllib.loads(blocks(example, "toml")[0])
    cluster = pg_cluster.shared()
    for statement in filter(str.strip, sql.split(";")):
        cluster.sql(statement)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "store-password").write_text("change-me\n")
    (credentials / "mqtt-password").write_text("unused\n")
    (credentials / "key-encryption-key").write_text(base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    # Only where the example's hosts are: this machine's broker (no TLS, no
    # account) and this test's PostgreSQL cluster.
    assert node["store"]["url"] == "postgresql://provisiond@db:5432/provisiond"
    node["store"]["url"] = f"postgresql://provisiond@127.0.0.1:{cluster.port}/provisiond"
    node["store"]["path"] = str(tmp_path / "unused.db")
    node["mqtt"].update(host="127.0.0.1", port=broker.port, username="", tls={"enabled": False})
    node["mqtt"]["topic_prefix"] = f"t{uuid.uuid4().hex[:10]}"
    config = Config.model_validate(node)
    _, key = seed_key(config)
    toml = write_toml(config, tmp_path / "provisiond.toml")
    async with daemon_process(toml, CREDENTIALS_DIRECTORY=str(credentials)) as proc:
        await proc.wait_event("cluster.elected", timeout=30)
        code, out, err = await provisiond(
            "call", "-c", str(toml), "daemon/stats", PROVISIOND_KEY=key
        )
    assert code == 0, err
    stats = json.loads(out)["body"]
    assert stats["cluster"] == {"group": "provisiond", "leader": True, "elections": 1}


async def test_every_daemon_shows_presence_and_last_seen_of_heartbeats_it_did_not_receive(
    tmp_path: Path, broker: Broker
) -> None:
    """`device/get` on any daemon of the group: online, and `last_seen` from the
    latest heartbeat, whichever daemon received it."""
    configs = node_configs(tmp_path, broker)
    seed_devices(configs[0], [7])
    _, key = seed_key(configs[0])
    async with (
        nodes(tmp_path, configs),
        RpcClient(configs[0]) as rpc,
        FakeDevice(configs[0], 7) as device,
    ):
        for _ in range(6):
            await device.heartbeat({"interval": 5})
            await asyncio.sleep(0.3)
        await asyncio.sleep(3.0)  # later than the first heartbeats by whole seconds
        sent = time.time()
        await device.heartbeat({"interval": 5})
        # Flushed within 0.2 s, read back by every daemon once a second.
        await asyncio.sleep(2.0)
        views = [(await rpc.call("device/get", {"deviceId": 7}, key=key))["body"] for _ in range(9)]
    for view in views:
        assert view["presence"]["online"] is True
        last_seen = datetime.fromisoformat(view["presence"]["last_seen"]).timestamp()
        assert last_seen >= int(sent), view["presence"]


async def test_in_a_group_the_newest_heartbeat_sets_the_deadline_even_an_earlier_one(
    tmp_path: Path, broker: Broker
) -> None:
    """As with one daemon, each heartbeat stands alone: a device that announced
    30 s and then 1 s is offline 1 s times the factor after its last heartbeat, not 30 s."""
    configs = node_configs(tmp_path, broker)
    seed_devices(configs[0], [9])
    async with (
        nodes(tmp_path, configs),
        PresenceLog(configs[0]) as published,
        FakeDevice(configs[0], 9) as device,
    ):
        await device.heartbeat({"interval": 30})
        await eventually(lambda: published.count(True).get(9) == 1, timeout=5)
        for _ in range(3):  # over the daemons of the group
            await device.heartbeat({"interval": INTERVAL})
            await asyncio.sleep(0.3)
        last = time.time()
        await eventually(lambda: published.count(False).get(9) == 1, timeout=10)
    offline_at = next(at for online, at in published.seen[9] if not online)
    assert offline_at - (last + INTERVAL * FACTOR) <= 1.0
