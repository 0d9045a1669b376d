"""Run provisiond against a mosquitto it starts itself, with a demo API key.

State lives in ./demo-state (delete it to start over). Ctrl-C, or SIGINT or
SIGTERM to this process alone, stops everything it started: the simulator,
then the daemon (which drains), then the broker.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE = ROOT / "demo-state"
PROVISIOND = [sys.executable, "-m", "provisiond"]
PR_SET_PDEATHSIG = 1
# How long each child may take to exit on SIGTERM before it is killed.
GRACE = {"simulator": 5.0, "daemon": 15.0, "broker": 5.0}


class Children:
    """What the demo started, stopped in reverse order however the demo ends.

    A signal only sets a flag (never raises mid-spawn, where a child could be
    started but not yet recorded). Each child runs in its own process group, so
    a terminal's Ctrl-C reaches only the demo, which then stops them in order;
    and each gets SIGTERM from the kernel if the demo dies without cleaning up
    (even kill -9).
    """

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _sig: int, _frame: object) -> None:
        self.stopping = True

    def start(self, name: str, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        # preexec_fn is unsafe only with threads, and the demo has none.
        proc = subprocess.Popen(argv, process_group=0, preexec_fn=_die_with_parent, **kwargs)  # type: ignore[call-overload]  # noqa: PLW1509
        self.procs.append((name, proc))
        return proc

    def sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; False if asked."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return not self.stopping

    def stop_all(self) -> None:
        # Cleanup is not interrupted by a second Ctrl-C.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(GRACE.get(name, 5.0))
                except subprocess.TimeoutExpired:
                    print(f"demo: {name} did not stop in time; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mosquitto exited; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("mosquitto did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=18830, help="broker port (default 18830)")
    parser.add_argument("--devices", type=int, default=3, help="simulated devices to run (0: none)")
    parser.add_argument(
        "--state", type=Path, default=DEFAULT_STATE, help=f"state folder (default {DEFAULT_STATE})"
    )
    args = parser.parse_args()
    state = args.state.resolve()
    children = Children()
    try:
        return run(args, state, children)
    finally:
        children.stop_all()


def run(args: argparse.Namespace, state: Path, children: Children) -> int:
    state.mkdir(exist_ok=True)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    (state / "mosquitto.conf").write_text(
        f"listener {args.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        f"persistence true\npersistence_location {state}/\n"
    )
    broker = children.start(
        "broker",
        [mosquitto, "-c", str(state / "mosquitto.conf")],
        stdout=(state / "mosquitto.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_port(args.port, broker, state / "mosquitto.log")

    config = state / "provisiond.toml"
    config.write_text(
        f'[daemon]\ngateway_id = "demo-gateway"\n\n[log]\nformat = "console"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {args.port}\nclient_id = "provisiond-demo"\n\n'
        f'[store]\npath = "provisiond.db"\n\n[presence]\nheartbeat_interval_seconds = 5\n'
    )
    env = {
        **os.environ,
        "PROVISIOND_CONFIG": str(config),
        "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}",
    }

    def cli(*argv: str) -> str:
        return subprocess.run(
            [*PROVISIOND, *argv], env=env, check=False, capture_output=True, text=True
        ).stdout

    cli("orgs", "create", "--id", "1", "--name", "demo")
    cli("users", "create", "--org", "1", "--id", "1")
    out = cli(
        "keys", "create", "--org", "1",
        "--scope", "devices:read", "--scope", "devices:write",
        "--scope", "provision:write", "--scope", "daemon:read",
    )  # fmt: skip
    key = out.strip().splitlines()[-1]
    print(
        f"""
provisiond demo — broker on 127.0.0.1:{args.port}, state in {state}
Demo API key (shown once; a new one is made each run):

    {key}

Try, in another terminal:

    mosquitto_rr -V 5 -p {args.port} -t provisiond/rpc/keys/whoami -e demo/replies \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{}}'

    mosquitto_rr -V 5 -p {args.port} -t provisiond/rpc/provision/token -e demo/replies \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{"orgId": 1, "ownerId": 1}}'

    PROVISIOND_CONFIG={config} PROVISIOND_KEY={key} \\
      .venv/bin/provisiond call keys/whoami

Watch presence and events:  mosquitto_sub -p {args.port} -t 'provisiond/#' -v
Ctrl-C stops the simulator, the daemon and the broker.
""",
        flush=True,
    )
    if children.stopping:
        return 0
    daemon = children.start("daemon", [*PROVISIOND, "run"], env=env)
    if args.devices > 0 and (ROOT / "tools" / "provisiond_sim").exists():
        if not children.sleep(1.5):
            return 0
        children.start(
            "simulator",
            [sys.executable, "-m", "provisiond_sim", "--port", str(args.port),
             "--devices", str(args.devices), "--org", "1", "--owner", "1"],
            env={**env, "PROVISIOND_KEY": key},
        )  # fmt: skip
    while not children.stopping:
        code = daemon.poll()
        if code is not None:
            return code  # the daemon stopped by itself (a bad config: 3)
        children.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
