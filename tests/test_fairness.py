"""Request slots are shared between API keys: a flood from one key waits its turn."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_proc import NotifySocket, daemon_process, write_toml

from provisiond.config import Config
from provisiond.replay import WINDOW_SECONDS, RecentIds
from provisiond.runtime.fairslots import FairSlots
from provisiond.runtime.features import FEATURES
from support import SLOW_FEATURE, Broker, RpcClient, make_config, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

SLOW = 0.4


def two_keys(
    tmp_path: Path, broker: Broker, *, slots: int, per_key: int
) -> tuple[Config, str, str]:
    """A daemon's config with `slots` request slots, `per_key` of them at most for
    one key; and two keys: the flooder's and the polite one's."""
    config = make_config(
        tmp_path,
        broker,
        daemon={"max_concurrent_requests": slots},
        limits={"max_inflight_per_key": per_key},
    )
    _, flooder = seed_key(config)
    _, polite = seed_key(config)
    return config, flooder, polite


async def pending_when_done(
    flood: list[asyncio.Future[dict[str, Any]]], polite: asyncio.Future[dict[str, Any]]
) -> int:
    reply = await asyncio.wait_for(polite, 20)
    assert reply["status"] == 200
    still = sum(not f.done() for f in flood)
    await asyncio.wait_for(asyncio.gather(*flood), 30)
    return still


async def test_a_waiting_key_is_served_before_a_flooding_key_drains(
    tmp_path: Path, broker: Broker
) -> None:
    # Four slots, and each key may hold all four: only the turn order is tested.
    config, flooder, polite = two_keys(tmp_path, broker, slots=4, per_key=4)
    async with running(config, features=[*FEATURES, SLOW_FEATURE]), RpcClient(config) as rpc:
        flood = [await rpc.send("test/slow", {"seconds": SLOW}, key=flooder) for _ in range(16)]
        await asyncio.sleep(0.1)  # the flood holds every slot, twelve more wait
        mine = await rpc.send("test/slow", {"seconds": 0.0}, key=polite)
        # First in, first out would serve all sixteen first; in turn, the polite
        # key gets the first slot that frees, with most of the flood still waiting.
        assert await pending_when_done(flood, mine) >= 8


async def test_one_key_holds_at_most_its_share_of_slots(tmp_path: Path, broker: Broker) -> None:
    config, flooder, polite = two_keys(tmp_path, broker, slots=8, per_key=2)
    async with running(config, features=[*FEATURES, SLOW_FEATURE]), RpcClient(config) as rpc:
        flood = [await rpc.send("test/slow", {"seconds": SLOW}, key=flooder) for _ in range(8)]
        await asyncio.sleep(0.1)
        mine = await rpc.send("test/slow", {"seconds": SLOW}, key=polite)
        # Free slots were there for the polite key at once; the flood ran two at a time.
        assert await pending_when_done(flood, mine) >= 4


async def test_slots_are_handed_out_round_robin_and_survive_cancellation() -> None:
    slots = FairSlots(capacity=1, per_caller=1)
    order: list[str] = []

    async def use(caller: str) -> None:
        async with slots.slot(caller):
            order.append(caller)
            await asyncio.sleep(0)

    await slots.acquire("a")  # hold the only slot while the queue forms
    tasks = [asyncio.create_task(use(c)) for c in ("a", "a", "a", "b", "c")]
    cancelled = asyncio.create_task(use("b"))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    slots.release("a")
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "a", "a"]
    assert slots.waiting == 0
    await asyncio.wait_for(slots.acquire("z"), 1)  # nothing leaked


def test_forgetting_old_replay_ids_costs_what_expired_not_what_is_kept() -> None:
    # The upkeep task prunes the recent-id set every 0.2 s on the event loop.
    # After a long flood it holds millions of ids; a prune that visits them
    # all stalls every other key's requests that often.
    recent = RecentIds()
    for i in range(1000):
        recent.add(f"{i:016x}", 0.0)  # expired by `now` below
    for i in range(1000, 1_000_000):
        recent.add(f"{i:016x}", 1000.0)
    now = 1000.0 + WINDOW_SECONDS - 1

    def timed_prune() -> float:
        started = time.perf_counter()
        recent.prune(now)
        return time.perf_counter() - started

    # Best of three: a shared machine may preempt any single call. Visiting
    # a million ids takes tens of milliseconds; the thousand expired, well under 5.
    assert min(timed_prune() for _ in range(3)) < 0.005
    assert len(recent) == 999_000
    assert f"{999:016x}" not in recent and f"{1000:016x}" in recent


def _thread_scheduling(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread of `pid`: (nice, scheduling policy), as `ps -eLo tid,ni,cls` shows them."""
    threads: dict[int, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        # Fields after the command name (which may hold spaces), from field 3 on.
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        threads[int(task.name)] = (int(fields[16]), int(fields[38]))
    return threads


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are Linux's")
@pytest.mark.parametrize("priority", ["background", "normal"])
async def test_the_store_thread_gives_way_to_request_handling(
    config: Config, tmp_path: Path, priority: str
) -> None:
    """`store.thread_priority`: the store's thread runs as background work (nice +5,
    SCHED_BATCH) by default, so another key's flood of writes holds up requests that
    need no write less; the event loop's thread keeps the daemon's own priority."""
    _, secret = seed_key(config)
    config_file = write_toml(
        config, tmp_path / "provisiond.toml", store={"thread_priority": priority}
    )
    notify = NotifySocket()
    notify.start()
    try:
        async with RpcClient(config) as rpc, daemon_process(config_file, notify) as daemon:
            await notify.wait_for("READY=1")
            # The store thread has served this key's lookup by now.
            reply = await asyncio.wait_for(await rpc.send("keys/whoami", key=secret), 10)
            assert reply["status"] == 200
            threads = _thread_scheduling(daemon.proc.pid)
    finally:
        notify.close()
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert threads[daemon.proc.pid] == (own_nice, os.SCHED_OTHER), threads
    background = [t for t, s in threads.items() if s == (own_nice + 5, os.SCHED_BATCH)]
    if priority == "background":
        assert len(background) == 1, threads
    else:
        assert not background, threads
        assert all(s == (own_nice, os.SCHED_OTHER) for s in threads.values()), threads
    assert not daemon.named("store.thread_priority")  # nothing could not be applied


async def test_a_key_alone_keeps_its_whole_share_and_shares_less_while_another_is_active() -> None:
    """`limits.shared_inflight_per_key`: the smaller bound applies only while
    another key held or asked for a slot within the last second."""
    now = [0.0]
    slots = FairSlots(capacity=16, per_caller=8, shared=2, clock=lambda: now[0])
    for _ in range(8):
        await slots.acquire("flood")  # alone: all eight at once
    ninth = asyncio.create_task(slots.acquire("flood"))
    await asyncio.sleep(0)
    assert not ninth.done()  # its whole share, and no more
    await slots.acquire("polite")  # a free slot, at once
    slots.release("polite")
    for _ in range(6):
        slots.release("flood")  # down to 2 held: still at the shared bound
    await asyncio.sleep(0)
    assert not ninth.done()
    slots.release("flood")  # 1 held: the ninth may go, as the second of two
    await asyncio.wait_for(ninth, 1)
    more = [asyncio.create_task(slots.acquire("flood")) for _ in range(6)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in more)
    now[0] += 1.5  # the polite key has been quiet for over a second
    slots.release("flood")  # any release looks again: alone, the share is 8 again
    await asyncio.wait_for(asyncio.gather(*more), 1)
    assert slots.bound("flood") == 8
