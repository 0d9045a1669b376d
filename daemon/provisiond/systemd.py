"""The sd_notify protocol: a datagram to $NOTIFY_SOCKET, abstract sockets included.

A few lines of socket code instead of a dependency; without NOTIFY_SOCKET
(not under systemd) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable


def _address(raw: str) -> str:
    # "@name" is an abstract-namespace socket: a leading NUL byte on Linux.
    return "\0" + raw[1:] if raw.startswith("@") else raw


def make_notifier(env: dict[str, str] | None = None) -> Callable[[str], None]:
    env = dict(os.environ) if env is None else env
    raw = env.get("NOTIFY_SOCKET", "")
    if not raw:
        return lambda _state: None
    address = _address(raw)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)

    def notify(state: str) -> None:
        # systemd gone or socket full: notifications are advisory.
        with contextlib.suppress(OSError):
            sock.sendto(state.encode(), address)

    return notify


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Half of WATCHDOG_USEC in seconds, when systemd asks for a watchdog for this process."""
    env = dict(os.environ) if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
