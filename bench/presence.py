"""Presence at fleet scale: heartbeat ingestion, memory per device, offline lateness.

    .venv/bin/python -m bench.presence [--devices 100000]

One run, one private mosquitto (bench/common.py; `max_queued_messages` is
raised there, otherwise mosquitto drops QoS 0 heartbeats past its queue limit
and the rates would be flattered). The daemon runs in this process.

Ingestion rate is measured as a drain: while this process's event loop is held
(so nothing is read), a publisher process pushes N heartbeats into the broker;
then the loop is released and we time how long the consumer takes to handle
all N. The same is done for a bare aiomqtt subscriber (the baseline: receive
and count, nothing else) and for the daemon, twice: first heartbeats (each one
an online transition that is also published) and steady state (already online).

Memory per tracked device: tracemalloc over everything allocated by
`provisiond/presence.py`, for N active devices each heartbeated once, after
the batch is flushed.

Offline lateness: with N devices tracked, a subset heartbeats with a short
interval and then stops; lateness = arrival of its offline presence message at
a subscriber - (time the heartbeat was SENT + timeout). Measured from the send,
it over-states lateness by the delivery delay, never under-states it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from bench.common import ENV, mosquitto, report, workdir

PREFIX = "bench"


# --- publisher (a separate process, so it does not share our CPU time slice)


def publish_main(argv: list[str]) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--seconds", type=float, default=0.0, help="spread sends over this long")
    parser.add_argument("--times", default="", help="write each send time (monotonic) here")
    parser.add_argument("--prefix", default=PREFIX)
    args = parser.parse_args(argv)

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", args.port, keepalive=120)
    client.loop_start()
    payload = json.dumps({"interval": args.interval, "uptime": 86400, "rssi": -61}).encode()
    sent = array("d")
    started = time.monotonic()
    info = None
    for n in range(args.count):
        if args.seconds:
            due = started + args.seconds * n / args.count
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sent.append(time.monotonic())
        info = client.publish(f"{args.prefix}/devices/{args.first + n}/heartbeat", payload, qos=0)
    if info is not None:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()
    if args.times:
        Path(args.times).write_bytes(sent.tobytes())


def observe_main(argv: list[str]) -> None:
    """Record when each device's offline presence arrives; retained messages are skipped."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from paho.mqtt.subscribeoptions import SubscribeOptions

    async def observe() -> None:
        arrived = array("d", [math.nan] * args.count)
        seen = 0
        async with aiomqtt.Client(
            "127.0.0.1", args.port, protocol=aiomqtt.ProtocolVersion.V5, keepalive=120
        ) as client:
            # retainHandling=2: no retained presence of earlier phases.
            await client.subscribe(
                f"{PREFIX}/devices/+/presence", options=SubscribeOptions(qos=1, retainHandling=2)
            )
            print("ready", flush=True)

            async def read() -> None:
                nonlocal seen
                async for message in client.messages:
                    index = int(message.topic.value.split("/")[2]) - args.first
                    if (
                        0 <= index < args.count
                        and math.isnan(arrived[index])
                        and not json.loads(message.payload)["online"]  # type: ignore[arg-type]
                    ):
                        arrived[index] = time.monotonic()
                        seen += 1
                        if seen == args.count:
                            return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(read(), args.timeout)
        Path(args.out).write_bytes(arrived.tobytes())

    asyncio.run(observe())


def publish(
    port: int,
    first: int,
    count: int,
    interval: float,
    *,
    seconds: float = 0.0,
    times: Path | None = None,
    prefix: str = PREFIX,
) -> None:
    """Run the publisher to completion (blocking this process's event loop on purpose)."""
    cmd = [sys.executable, "-m", "bench.presence", "publish", "--port", str(port),
           "--first", str(first), "--count", str(count), "--interval", str(interval),
           "--seconds", str(seconds), "--prefix", prefix]  # fmt: skip
    if times is not None:
        cmd += ["--times", str(times)]
    subprocess.run(cmd, env=ENV, check=True)


async def publish_async(
    port: int, first: int, count: int, interval: float, *, seconds: float, times: Path
) -> None:
    cmd = [sys.executable, "-m", "bench.presence", "publish", "--port", str(port),
           "--first", str(first), "--count", str(count), "--interval", str(interval),
           "--seconds", str(seconds), "--times", str(times)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*cmd, env=ENV)
    assert await proc.wait() == 0


# --- helpers


def seed(db_path: Path, n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
    from provisiond import auth
    from provisiond.schema import all_migrations
    from provisiond.store import connect, migrate

    db = connect(db_path)
    migrate(db, all_migrations())
    auth.create_org(db, 1, "bench")
    auth.create_user(db, 1, 1)
    db.conn.close()
    conn = sqlite3.connect(db_path)
    now = time.time()
    with conn:
        conn.executemany(
            "INSERT INTO devices (id, org_id, owner_id, state, capabilities, public_key,"
            " created_at, activated_at) VALUES (?, 1, 1, 'active', 2, ?, ?, ?)",
            ((i, b"k" * 32, now, now) for i in range(1, n + 1)),
        )
    conn.close()


async def drain_rate(count: Any, target: int, fill: Any) -> float:
    """Hold the loop while `fill()` loads the broker, then time draining `target` messages."""
    fill()  # synchronous: nothing is read meanwhile
    started = time.monotonic()
    while count() < target:
        await asyncio.sleep(0.002)
    return target / (time.monotonic() - started)


async def bare_rate(port: int, n: int, prefix: str = PREFIX) -> float:
    received = 0
    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:  # fmt: skip
        await client.subscribe(f"{prefix}/devices/+/heartbeat", qos=0)

        async def read() -> None:
            nonlocal received
            async for _message in client.messages:
                received += 1

        reader = asyncio.create_task(read())
        rate = await drain_rate(lambda: received, n, lambda: publish(port, 1, n, 30, prefix=prefix))
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return rate


def config_for(directory: Path, port: int) -> Any:
    from provisiond.config import Config

    return Config.model_validate(
        {
            "log": {"level": "warning"},
            "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": PREFIX,
                     "client_id": "provisiond-bench", "keepalive_seconds": 120},
            "store": {"path": str(directory / "provisiond.db")},
            "presence": {"min_interval_seconds": 0.5},
        }
    )  # fmt: skip


@contextlib.asynccontextmanager
async def daemon(config: Any) -> AsyncIterator[Any]:
    from provisiond.server import Server

    server = Server(config)
    task = asyncio.create_task(server.serve())
    await asyncio.wait_for(server.ready.wait(), 60)
    try:
        yield server
    finally:
        server.request_stop()
        await asyncio.wait_for(task, 60)


async def settled(presence: Any) -> None:
    """Wait until every change is published and saved."""
    while presence._outbox or presence._publishing or presence._dirty:
        await asyncio.sleep(0.05)
    await presence.flush()


async def memory_per_device(config: Any, n: int) -> dict[str, float]:
    """Bytes held by presence.py per active device: loaded, then each heartbeated once."""
    from provisiond.clock import Clock
    from provisiond.presence import tracker as presence_mod
    from provisiond.runtime.app import App
    from provisiond.schema import all_migrations
    from provisiond.store import Store
    from provisiond.transport import Delivery, Transport

    store = Store(config.store.path)
    await store.open(all_migrations())
    app = App(config, store, Transport(config), Clock())  # never connected: nothing is published
    only = [tracemalloc.Filter(True, presence_mod.__file__)]

    def held() -> int:
        gc.collect()
        return sum(
            s.size for s in tracemalloc.take_snapshot().filter_traces(only).statistics("filename")
        )

    tracemalloc.start()
    try:
        presence = presence_mod.Presence(app)
        await presence.start()
        loaded = held()
        payload = json.dumps({"interval": 30, "uptime": 86400, "rssi": -61}).encode()
        for i in range(1, n + 1):
            presence.heartbeat(str(i), payload)
        presence._outbox.clear()  # with a broker these are published, then gone
        await presence.flush()
        tracked = held()
        tracemalloc.stop()
        # CPU per heartbeat on the daemon's side of its MQTT client: route match + handler,
        # what server.py's dispatcher does for a QoS 0 heartbeat.
        app.route("devices/+/heartbeat", presence.on_heartbeat, qos=0)
        deliveries = [
            Delivery(f"{PREFIX}/devices/{i}/heartbeat", payload, 0, False, 1)
            for i in range(1, n + 1)
        ]
        started = time.perf_counter()
        for delivery in deliveries:
            found = app.topics.match(delivery.topic)
            assert found is not None
            found[0].handler(delivery, found[1])
        handler_us = (time.perf_counter() - started) / n * 1e6
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await app.cancel_tasks()
        await store.close()
    return {
        "loaded_bytes_per_device": round(loaded / n, 1),
        "tracked_bytes_per_device": round(tracked / n, 1),
        "handler_us_per_heartbeat": round(handler_us, 2),
    }


async def lateness(
    port: int,
    presence: Any,
    first: int,
    count: int,
    interval: float,
    factor: float,
    seconds: float,
    directory: Path,
) -> dict[str, Any]:
    """Devices first..first+count heartbeat once (spread over `seconds`) and go silent.

    The observer is its own process, so reading the offline messages does not
    take CPU time from the daemon being measured.
    """
    sent_file, arrived_file = directory / f"sent-{first}.bin", directory / f"arrived-{first}.bin"
    timeout = seconds + interval * factor + 120
    observer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.presence", "observe", "--port", str(port),
        "--first", str(first), "--count", str(count), "--timeout", str(timeout),
        "--out", str(arrived_file), env=ENV, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert observer.stdout is not None
    assert (await observer.stdout.readline()).strip() == b"ready"
    presence.lateness.clear()
    presence.record_lateness = True
    await publish_async(port, first, count, interval, seconds=seconds, times=sent_file)
    assert await observer.wait() == 0
    presence.record_lateness = False
    sent, arrived = array("d"), array("d")
    sent.frombytes(sent_file.read_bytes())
    arrived.frombytes(arrived_file.read_bytes())
    late = sorted(a - (s + interval * factor) for s, a in zip(sent, arrived, strict=True)
                  if not math.isnan(a))  # fmt: skip
    fired = sorted(presence.lateness)

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    return {
        "devices_expiring": count,
        "within_seconds": seconds,
        "offline_seen": len(late),
        "published_lateness_p50_s": pct(late, 0.50),
        "published_lateness_p99_s": pct(late, 0.99),
        "published_lateness_max_s": pct(late, 1.0),
        "expiry_fired_lateness_p99_s": pct(fired, 0.99),
    }


async def run(n: int, burst: bool) -> dict[str, Any]:
    from provisiond.logs import setup as setup_logs

    figures: dict[str, Any] = {"devices": n}
    with workdir() as directory, mosquitto(directory) as port:
        config = config_for(directory, port)
        setup_logs(config.log)
        seed(directory / "provisiond.db", n)

        # On a copy: the measurement saves presence, which must not leak into the run.
        mem_db = directory / "memory.db"
        shutil.copy(directory / "provisiond.db", mem_db)
        mem_config = config.model_copy(
            update={"store": config.store.model_copy(update={"path": str(mem_db)})}
        )
        figures["memory_and_cpu"] = await memory_per_device(mem_config, n)

        # Three times, keeping the fastest: the baseline must not be flattered down.
        bare = max([await bare_rate(port, n) for _ in range(3)])
        figures["bare_aiomqtt_msgs_per_s"] = round(bare)
        async with daemon(config) as server:
            app = server.app
            from provisiond.presence import PRESENCE

            presence = app.services.get(PRESENCE)
            counters = app.counters

            first = await drain_rate(
                lambda: counters["presence.heartbeats"], n, lambda: publish(port, 1, n, 30)
            )
            await settled(presence)
            assert presence._online == n, presence._online
            # Steady state (already online): three drains, keeping the fastest, as for bare.
            steady = 0.0
            for k in (2, 3, 4):
                steady = max(steady, await drain_rate(
                    lambda: counters["presence.heartbeats"], k * n, lambda: publish(port, 1, n, 30)
                ))  # fmt: skip
                await settled(presence)
            figures["daemon_first_heartbeats_msgs_per_s"] = round(first)
            figures["daemon_steady_heartbeats_msgs_per_s"] = round(steady)
            figures["ratio_steady_vs_bare"] = round(steady / bare, 3)
            figures["ratio_first_vs_bare"] = round(first / bare, 3)
            # The same ratio from costs: the bare path's cost per message plus ours.
            bare_us = 1e6 / bare
            handler_us = figures["memory_and_cpu"]["handler_us_per_heartbeat"]
            figures["ratio_from_cpu_cost"] = round(bare_us / (bare_us + handler_us), 3)

            interval, factor = 1.0, app.config.presence.timeout_factor
            # Outages of part of the fleet while all N stay tracked: 1% within
            # 1 s, then 10% within 10 s.
            small = max(1, n // 100)
            figures["lateness_1pct_in_1s"] = await lateness(
                port, presence, 1, small, interval, factor, 1.0, directory
            )
            await settled(presence)
            figures["lateness_10pct_in_10s"] = await lateness(
                port, presence, small + 1, n // 10, interval, factor, 10.0, directory
            )
            await settled(presence)
            if burst:
                # The extreme: every deadline of the fleet within the same second or so.
                figures["lateness_whole_fleet_burst"] = await lateness(
                    port, presence, 1, n, interval, factor, 0.0, directory
                )
            figures["counters"] = {
                k: v for k, v in sorted(counters.items()) if k.startswith("presence.")
            }
    return figures


def main(quick: bool | None = None) -> dict[str, Any] | None:
    if quick is not None:
        # Called by `python -m bench`: the standard fleet, or a small one with --quick.
        return report("presence", asyncio.run(run(10_000 if quick else 100_000, False)))
    if len(sys.argv) > 1 and sys.argv[1] == "publish":
        publish_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "observe":
        observe_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--burst", action="store_true", help="also expire the whole fleet at once")
    args = parser.parse_args()
    figures = asyncio.run(run(args.devices, args.burst))
    return report("presence", figures)


if __name__ == "__main__":
    main()
