"""Run provisiond against a mosquitto it starts itself, with a demo API key.

State lives in ./demo-state (delete it to start over). Ctrl-C, or SIGINT or
SIGTERM to this process alone, stops everything it started: the simulator,
then the daemon (which drains), then the broker.
"""

from __future__ import annotations

import argparse
import ctypes
import getpass
import glob
import os
import secrets
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


def dynsec_plugin() -> str:
    """mosquitto's dynamic-security plugin, wherever this machine's package put it."""
    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))
    found += sorted(glob.glob("/usr/lib/mosquitto_dynamic_security.so"))
    if not found:
        sys.exit("mosquitto's dynamic-security plugin is missing (package mosquitto 2.x)")
    return found[0]


def secret_file(path: Path) -> str:
    """A password kept in a 0600 file, made on first use."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def broker_config(state: Path, port: int) -> Path:
    """The shipped dynamic-security setup (config/mosquitto/): the daemon and the
    `backend` service log in with passwords made here once; every simulated
    device gets its own account from provisiond when it is provisioned."""
    passwords = {
        name: secret_file(state / f"{name}-password") for name in ("provisiond", "backend")
    }
    dynsec_state = state / "dynamic-security.json"
    if not dynsec_state.exists():
        sys.path.insert(0, str(ROOT / "daemon"))
        from provisiond.broker_accounts.bootstrap import init_dynsec

        init_dynsec(
            ROOT / "config" / "mosquitto" / "dynamic-security.json", dynsec_state, passwords
        )
    conf = state / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\nset_tcp_nodelay true\n"
        f"persistence true\npersistence_location {state}/\n"
        f"plugin {dynsec_plugin()}\nplugin_opt_config_file {dynsec_state}\n"
        # As root, mosquitto would switch to the `mosquitto` user, who may not
        # read this folder.
        f"user {getpass.getuser()}\n"
    )
    return conf


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
    conf = broker_config(state, args.port)
    broker = children.start(
        "broker",
        [mosquitto, "-c", str(conf)],
        stdout=(state / "mosquitto.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_port(args.port, broker, state / "mosquitto.log")

    config = state / "provisiond.toml"
    config.write_text(
        f'[daemon]\ngateway_id = "demo-gateway"\n\n[log]\nformat = "console"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {args.port}\nclient_id = "provisiond-demo"\n'
        f'username = "provisiond"\npassword_file = "provisiond-password"\n\n'
        f'[broker_accounts]\nbackend = "mosquitto-dynsec"\nhost = "127.0.0.1"\n'
        f"port = {args.port}\ntls_port = {args.port}\n\n"
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

The broker runs mosquitto's dynamic-security plugin: the service account is
`backend` (password in {state / "backend-password"}), and each device gets its
own account with its provision token. Try, in another terminal:

    B="-p {args.port} -u backend -P $(cat {state / "backend-password"})"
    mosquitto_rr -V 5 $B -t provisiond/rpc/keys/whoami -e provisiond/replies/backend/demo \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{}}'

    mosquitto_rr -V 5 $B -t provisiond/rpc/provision/token -e provisiond/replies/backend/demo \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{"orgId": 1, "ownerId": 1}}'

    PROVISIOND_CONFIG={config} PROVISIOND_KEY={key} \\
      .venv/bin/provisiond call keys/whoami

Watch presence and events:  mosquitto_sub $B -t 'provisiond/events/#' -t 'provisiond/devices/+/presence' -v
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
             "--devices", str(args.devices), "--org", "1", "--owner", "1",
             "--username", "backend", "--password-file", str(state / "backend-password")],
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
