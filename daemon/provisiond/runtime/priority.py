"""The CPU priority of the daemon's background threads.

On a busy machine the threads of one process compete for the cores with each
other and with the broker. The event loop answers every request and heartbeat;
the store's thread commits writes, which can wait a little without
anyone noticing. A request that needs no write (a grant, `keys/whoami`, a
heartbeat) should not wait for a core, or for the interpreter lock, behind a
flood of another service's writes (docs/protocol.md, "Fair share between
keys"). So the store's thread can be marked as background work: a higher nice
value, and `SCHED_BATCH`, which tells the kernel it is throughput work that
should not preempt others when it wakes. Both are allowed without privileges:
a thread may always lower its own priority. Linux only; elsewhere it is a
no-op, reported as such.
"""

from __future__ import annotations

import os
from typing import Literal

ThreadPriority = Literal["background", "normal"]

# Added to the thread's nice value: a third of a normal thread's CPU weight
# when both want the same core, never starved outright (SCHED_IDLE would be,
# under unrelated load).
BACKGROUND_NICE = 5


def lower_current_thread(priority: ThreadPriority) -> str | None:
    """Apply `priority` to the calling thread; returns why it could not, if it could not."""
    if priority == "normal":
        return None
    if not hasattr(os, "SCHED_BATCH"):
        return "thread priorities are not supported on this platform"
    try:
        # On Linux, the 0 "process" of these calls is the calling thread alone.
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(19, nice + BACKGROUND_NICE))
    except OSError as exc:
        return f"could not lower the thread's priority: {exc.strerror}"
    return None
