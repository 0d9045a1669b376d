"""`provisiond run` as a real subprocess, with a notify socket the test owns.

What systemd would see: the sd_notify datagrams (with arrival times) and the
process's stdout (JSON log lines), plus a way to send it signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import support
from provisiond.config import Config

ROOT = Path(__file__).resolve().parents[1]


def write_toml(config: Config, path: Path, **overrides: dict[str, Any]) -> Path:
    """The test's config as a TOML file, with sections overridden (enough TOML for our keys)."""
    data = config.model_dump(exclude={"source", "plugins"})
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    lines: list[str] = []

    def emit(table: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in values.items():
            if isinstance(v, dict):
                emit(f"{table}.{k}", v)

    for section, values in data.items():
        emit(section, values)
    path.write_text("\n".join(lines))
    return path


class NotifySocket:
    """A datagram socket like systemd's: records every notification and when it came."""

    def __init__(self, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"provisiond-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # Short path: AF_UNIX paths are limited to 107 bytes, pytest's tmp paths are long.
            self._dir = tempfile.mkdtemp(prefix="pvd-")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.messages.append((loop.time(), data.decode()))
            self._changed.set()

    def lines(self) -> list[tuple[float, str]]:
        """Every `KEY=value` line received, each with its datagram's arrival time."""
        return [(t, line) for t, msg in self.messages for line in msg.split("\n") if line]

    def index(self, line: str) -> int:
        return [text for _t, text in self.lines()].index(line)

    async def wait_for(
        self, match: str | Callable[[str], bool], *, after: int = 0, timeout: float = 20
    ) -> int:
        """Wait for a line (exact text or predicate) at position >= `after`; its position."""
        test = (lambda line: line == match) if isinstance(match, str) else match
        async with asyncio.timeout(timeout):
            while True:
                for i, (_t, line) in enumerate(self.lines()):
                    if i >= after and test(line):
                        return i
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class DaemonProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[str] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            # Subprocess daemons' output joins the suite-wide secret check.
            support.LOG_EVENTS.append(line)
            self._changed.set()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines printed so far."""
        found = []
        for line in self.output:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == name]

    async def wait_event(self, name: str, *, count: int = 1, timeout: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while len(self.named(name)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.named(name)[count - 1]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._task, 5)
        return code

    def tail(self) -> str:
        return "\n".join(self.output[-40:])


def python_c(code: str, *pythonpath: Path, timeout: float = 60) -> str:
    """Run `python -c code` in a fresh interpreter that sees only `pythonpath` of this
    repository (what is imported is then the code's doing alone): its stdout."""
    env = {**os.environ, "PYTHONPATH": ":".join(str(p) for p in pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        timeout=timeout,
    ).stdout  # fmt: skip


async def provisiond(*argv: str, **env: str) -> tuple[int, str, str]:
    """Run `provisiond *argv` to its end, with no PROVISIOND_* variable but `env`:
    (exit code, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    environ["PYTHONPATH"] = f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"
    environ.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provisiond", *argv,
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def reaped(proc: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """`proc` for the block; killed if the block leaves it running, and waited for,
    so no test leaves a child process (or its pipes) behind."""
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def daemon_process(
    config_file: Path, notify: NotifySocket | None = None, **env: str
) -> AsyncIterator[DaemonProcess]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("PROVISIOND_", "WATCHDOG_"))
    }
    environ.pop("NOTIFY_SOCKET", None)
    environ["PYTHONPATH"] = f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"
    if notify is not None:
        environ["NOTIFY_SOCKET"] = notify.address
    environ.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provisiond", "run", "-c", str(config_file),
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with reaped(proc):
        yield DaemonProcess(proc)
