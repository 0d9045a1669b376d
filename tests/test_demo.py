"""`scripts/demo.sh` stops everything it started when it alone gets SIGINT or SIGTERM.

The signal goes to the demo's process only (as `kill -INT <pid>` does, not as
a terminal's Ctrl-C, which signals the whole foreground process group): the
broker, the daemon and the device simulator must all be gone when it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support import free_port, sqlite_only

ROOT = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = cmdline(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()).strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; only its parent's wait is missing


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@sqlite_only("the demo keeps its state in a SQLite file in its state folder")
def test_demo_stops_what_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    state = tmp_path / "state"
    log = (tmp_path / "demo.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    demo = subprocess.Popen(
        [str(ROOT / "scripts" / "demo.sh"), "--port", str(free_port()), "--devices", "2",
         "--state", str(state)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
        # Its own session: the signal below reaches the demo alone, never a group.
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        started: dict[int, str] = {}
        while time.monotonic() < deadline:
            started = descendants(demo.pid)
            output = (tmp_path / "demo.log").read_text(errors="replace")
            if "device(s) online" in output:
                break
            assert demo.poll() is None, output
            time.sleep(0.2)
        else:
            raise AssertionError(f"the simulator never came up:\n{output}")
        kinds = {k for k in ("mosquitto", "provisiond run", "provisiond_sim") if any(
            k in c for c in started.values()
        )}  # fmt: skip
        assert kinds == {"mosquitto", "provisiond run", "provisiond_sim"}, started
        # The demo key reaches the simulator through its environment, never its command line.
        assert not any("sk_live_" in c for c in started.values()), started

        # The `provisiond call` line the demo prints works as printed.
        lines = output.splitlines()
        [at] = [i for i, line in enumerate(lines) if line.strip().startswith("PROVISIOND_CONFIG=")]
        command = lines[at].strip().rstrip("\\") + " " + lines[at + 1].strip()
        done = subprocess.run(
            ["bash", "-c", command],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and '"status": 200' in done.stdout, done.stderr

        os.kill(demo.pid, sig)
        code = demo.wait(30)
        # Whatever it started has exited, without anyone signalling them but the demo.
        time.sleep(0.5)
        left = {pid: cmd for pid, cmd in started.items() if alive(pid)}
        assert left == {}, f"still running after the demo exited: {left}"
        assert code == 0
    finally:
        for pid in descendants(demo.pid) if demo.poll() is None else {}:
            os.kill(pid, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        log.close()
