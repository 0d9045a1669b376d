"""Faults: broker killed, daemon killed, disk full or read-only — nothing lost, nothing doubled.

The quick variants run in CI; `--heavy` runs them with 10k requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import LogCapture

import support
from provisiond.config import Config
from provisiond.store import dialect
from support import Broker, RpcClient, make_config, open_db, remember_secret, running, seed_key

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]


class PatientRequester:
    """A requester that survives broker loss: it reconnects and re-sends every
    unanswered request with the same correlation data, as a real client should.
    Idempotency on the daemon side turns those re-sends into replays."""

    def __init__(self, config: Config, key: str, bodies: list[dict[str, Any]]) -> None:
        self.config = config
        self.key = key
        self.requests = {uuid.uuid4().bytes: body for body in bodies}
        self.replies: dict[bytes, list[dict[str, Any]]] = {}
        self.reply_topic = f"replies-{uuid.uuid4().hex}"
        self.client_id = f"patient-{uuid.uuid4().hex[:8]}"

    @property
    def answered(self) -> int:
        return len(self.replies)

    def unanswered(self) -> list[bytes]:
        return [c for c in self.requests if c not in self.replies]

    async def run(self, *, deadline: float, resend_after: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        while self.unanswered() and loop.time() < deadline:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.config.mqtt.port, identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=1000,
                ) as client:  # fmt: skip
                    await client.subscribe(self.reply_topic, qos=1)
                    await self._send(client, self.unanswered())
                    await self._collect(client, deadline, resend_after)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    async def _send(self, client: aiomqtt.Client, correlations: list[bytes]) -> None:
        for corr in correlations:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = corr
            props.UserProperty = ("authorization", f"Bearer {self.key}")
            await client.publish(
                f"{self.config.mqtt.topic_prefix}/rpc/provision/token",
                json.dumps(self.requests[corr]).encode(), qos=1, properties=props,
            )  # fmt: skip

    async def _collect(self, client: aiomqtt.Client, deadline: float, resend_after: float) -> None:
        loop = asyncio.get_running_loop()
        messages = client.messages
        while self.unanswered() and loop.time() < deadline:
            try:
                message = await asyncio.wait_for(messages.__anext__(), resend_after)
            except TimeoutError:
                # Silence: whatever is still unanswered was lost somewhere; ask again.
                await self._send(client, self.unanswered())
                continue
            corr = bytes(message.properties.CorrelationData)  # type: ignore[union-attr]
            reply = json.loads(message.payload)  # type: ignore[arg-type]
            if reply.get("status") == 200:
                remember_secret(reply["body"]["token"])
            self.replies.setdefault(corr, []).append(reply)


def assert_each_answered_once_without_duplicates(
    requester: PatientRequester, config: Config
) -> None:
    assert not requester.unanswered(), f"{len(requester.unanswered())} requests never answered"
    tokens: set[str] = set()
    device_ids: set[int] = set()
    for corr, replies in requester.replies.items():
        first = replies[0]
        assert first["status"] == 200, first
        # A redelivered request gets the same answer, never a second device.
        assert all(r == first for r in replies), (corr, replies)
        tokens.add(first["body"]["token"])
        device_ids.add(first["body"]["deviceId"])
    n = len(requester.requests)
    assert len(tokens) == n and len(device_ids) == n
    db = open_db(config)
    if dialect(db) == "sqlite":
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == n
    live = {
        row[0]
        for row in db.execute(
            "SELECT hash FROM provision_tokens WHERE used_at IS NULL AND revoked_at IS NULL"
        )
    }
    # Every token the requester received is a live token of the store.
    assert {hashlib.sha256(t.encode()).hexdigest() for t in tokens} <= live
    assert len(live) == n


async def test_broker_killed_and_restarted_under_load(
    tmp_path: Path, own_broker: Broker, heavy: bool, logs: LogCapture
) -> None:
    n = 10_000 if heavy else 600
    config = make_config(tmp_path, own_broker)
    _, key = seed_key(config, users=(1,))
    requester = PatientRequester(config, key, [{"orgId": 1, "ownerId": 1}] * n)
    async with running(config):
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(requester.run(deadline=loop.time() + (600 if heavy else 90)))
        while requester.answered < 10:
            assert not task.done(), task
            await asyncio.sleep(0.005)
        own_broker.kill()
        assert requester.unanswered(), (
            "everything was answered before the kill"
        )  # SIGKILL: the broker loses whatever it held in memory
        await asyncio.sleep(0.5)
        own_broker.start()
        await task
    assert_each_answered_once_without_duplicates(requester, config)


def _daemon(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"}
    return subprocess.Popen(
        [sys.executable, "-m", "provisiond", "run", "-c", str(config_path)],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _write_config(config: Config, path: Path) -> None:
    m, s = config.mqtt, config.store
    path.write_text(
        f'[log]\nformat = "json"\n[mqtt]\nclient = "{m.client}"\nhost = "127.0.0.1"\nport = {m.port}\n'
        f'topic_prefix = "{m.topic_prefix}"\nclient_id = "{m.client_id}"\n'
        f"reconnect_min_seconds = 0.1\nreconnect_max_seconds = 1.0\n"
        f'[store]\npath = "{s.path}"\nurl = "{s.url}"\n'
        # On PostgreSQL the store keeps the signing keys, sealed under this file.
        + (f'key_encryption_key_file = "{s.key_encryption_key_file}"\n'
           if s.key_encryption_key_file else "")
    )  # fmt: skip


async def _wait_serving(config: Config, key: str, timeout: float = 20) -> None:
    # Before the daemon's first subscription exists the broker drops requests, so ask again.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with RpcClient(config) as rpc:
        while True:
            try:
                await rpc.call("keys/whoami", {}, key=key, timeout=0.5)
                return
            except TimeoutError:
                assert loop.time() < deadline, "daemon never answered"


async def test_daemon_kill9_under_load_loses_and_doubles_nothing(
    tmp_path: Path, broker: Broker, heavy: bool
) -> None:
    n = 10_000 if heavy else 600
    config = make_config(tmp_path, broker)
    config_path = tmp_path / "provisiond.toml"
    _write_config(config, config_path)
    log = tmp_path / "daemon.log"
    _, key = seed_key(config, users=(1,))
    proc = _daemon(config_path, log)
    try:
        await _wait_serving(config, key)
        requester = PatientRequester(config, key, [{"orgId": 1, "ownerId": 1}] * n)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(requester.run(deadline=loop.time() + (600 if heavy else 90)))
        while requester.answered < 10:
            assert not task.done() and proc.poll() is None
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Otherwise the kill proved nothing.
        assert requester.unanswered(), "everything was answered before the kill"
        # The broker keeps the daemon's session: requests published meanwhile,
        # and those delivered but never acknowledged, wait there for the restart.
        proc = _daemon(config_path, log)
        await task
        await _wait_serving(config, key)  # SIGTERM before its handlers exist would just kill it
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    support.LOG_EVENTS.extend(log.read_text().splitlines())
    assert_each_answered_once_without_duplicates(requester, config)
    text = log.read_text()
    assert key not in text and not any(t in text for t in _tokens(requester))


def _tokens(requester: PatientRequester) -> list[str]:
    return [r[0]["body"]["token"] for r in requester.replies.values()]


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to fill (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    # Unbuffered: a buffered file keeps the bytes that did not fit and raises
    # ENOSPC again when it is closed, outside the suppress (whether it does
    # depends on how the last chunk met the end of the disk).
    with path.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)


@contextlib.asynccontextmanager
async def daemon_on_small_disk(
    tmp_path: Path, broker: Broker
) -> AsyncIterator[tuple[Path, str, RpcClient]]:
    """A daemon whose store lives on its own small tmpfs, after one good write."""
    with small_disk(tmp_path / "disk") as disk:
        # A SQLite file on both test stores: the filesystem is the fault here.
        config = make_config(tmp_path, broker, store={"path": str(disk / "p.db"), "url": ""})
        _, key = seed_key(config, users=(1,))
        async with running(config), RpcClient(config) as rpc:
            assert (await rpc.call("provision/token", PROVISION, key=key))["status"] == 200
            yield disk, key, rpc


PROVISION = {"orgId": 1, "ownerId": 1}
# The fault is the SQLite file's own small disk, whatever store the suite runs on.
SMALL_DISK = support.sqlite_only("a SQLite file on a full (or read-only) disk of its own")


@SMALL_DISK
async def test_disk_full_gives_503_then_recovers(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    async with daemon_on_small_disk(tmp_path, broker) as (disk, key, rpc):
        before = _devices(disk / "p.db")
        _fill(disk / "junk")
        statuses = []
        for _ in range(200):
            reply = await rpc.call("provision/token", PROVISION, key=key)
            statuses.append(reply["status"])
            if reply["status"] == 503:
                assert reply["error"]["code"] == "store_unavailable"
                break
        assert statuses[-1] == 503, "a full disk never refused a write"
        # Reads still work; the daemon is up.
        assert (await rpc.call("keys/whoami", {}, key=key))["status"] == 200
        (disk / "junk").unlink()
        assert (await rpc.call("provision/token", PROVISION, key=key))["status"] == 200
        # Every 200 made exactly one device; the 503 made none.
        assert _devices(disk / "p.db") == before + statuses.count(200) + 1
        db = sqlite3.connect(disk / "p.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _devices(path: Path) -> int:
    return int(sqlite3.connect(path).execute("SELECT COUNT(*) FROM devices").fetchone()[0])


@SMALL_DISK
async def test_read_only_store_gives_503_then_recovers(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    async with daemon_on_small_disk(tmp_path, broker) as (disk, key, rpc):
        remount = subprocess.run(
            ["mount", "-o", "remount,ro", str(disk)],
            capture_output=True,
            text=True,
            check=False,
        )
        if remount.returncode != 0:
            # Linux refuses to remount read-only while a file is open for
            # writing (EBUSY); a kernel-forced read-only remount after I/O
            # errors gives EROFS, which takes the same path as disk full.
            pytest.skip(
                f"cannot make the store read-only under a running daemon: {remount.stderr.strip()}"
            )
        try:
            reply = await rpc.call("provision/token", PROVISION, key=key)
            assert reply["status"] == 503 and reply["error"]["code"] == "store_unavailable"
            assert (await rpc.call("keys/whoami", {}, key=key))["status"] == 200
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert (await rpc.call("provision/token", PROVISION, key=key))["status"] == 200
