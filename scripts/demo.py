"""Run provisiond against a mosquitto it starts itself, with a demo API key.

State lives in ./demo-state (delete it to start over). Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import getpass
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
STATE = ROOT / "demo-state"
PROVISIOND = [sys.executable, "-m", "provisiond"]


DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def _secret_file(path: Path) -> str:
    """A password kept in a 0600 file, made on first use."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mosquitto exited; see {STATE / 'mosquitto.log'}")
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
    args = parser.parse_args()

    STATE.mkdir(exist_ok=True)
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    # The shipped dynamic-security setup (config/mosquitto/): the daemon and the
    # `backend` service log in with passwords made here once; every simulated
    # device gets its own account from provisiond when it is provisioned.
    passwords = {
        name: _secret_file(STATE / f"{name}-password") for name in ("provisiond", "backend")
    }
    dynsec_state = STATE / "dynamic-security.json"
    if not dynsec_state.exists():
        sys.path.insert(0, str(ROOT / "daemon"))
        from provisiond.broker_accounts.bootstrap import init_dynsec

        init_dynsec(
            ROOT / "config" / "mosquitto" / "dynamic-security.json", dynsec_state, passwords
        )
    (STATE / "mosquitto.conf").write_text(
        f"listener {args.port} 127.0.0.1\nallow_anonymous false\nset_tcp_nodelay true\n"
        f"persistence true\npersistence_location {STATE}/\n"
        f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {dynsec_state}\n"
        # As root, mosquitto would switch to the `mosquitto` user, who may not
        # read this folder.
        f"user {getpass.getuser()}\n"
    )
    broker = subprocess.Popen(
        [mosquitto, "-c", str(STATE / "mosquitto.conf")],
        stdout=(STATE / "mosquitto.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_port(args.port, broker)

    config = STATE / "provisiond.toml"
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
provisiond demo — broker on 127.0.0.1:{args.port}, state in {STATE}
Demo API key (shown once; a new one is made each run):

    {key}

The broker runs mosquitto's dynamic-security plugin: the service account is
`backend` (password in {STATE / "backend-password"}), and each device gets its
own account with its provision token. Try, in another terminal:

    B="-p {args.port} -u backend -P $(cat {STATE / "backend-password"})"
    mosquitto_rr -V 5 $B -t provisiond/rpc/keys/whoami -e provisiond/replies/backend/demo \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{}}'

    mosquitto_rr -V 5 $B -t provisiond/rpc/provision/token -e provisiond/replies/backend/demo \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{"orgId": 1, "ownerId": 1}}'

Watch presence and events:  mosquitto_sub $B -t 'provisiond/events/#' -t 'provisiond/devices/+/presence' -v
Ctrl-C stops the daemon and the broker.
""",
        flush=True,
    )
    sim: subprocess.Popen[bytes] | None = None

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # A SIGTERM (e.g. from `timeout` or a service manager) stops everything as Ctrl-C does.
    signal.signal(signal.SIGTERM, on_term)
    daemon = subprocess.Popen([*PROVISIOND, "run"], env=env)
    try:
        if args.devices > 0 and (ROOT / "daemon" / "provisiond" / "sim").exists():
            time.sleep(1.5)
            sim = subprocess.Popen(
                [sys.executable, "-m", "provisiond.sim", "--port", str(args.port),
                 "--devices", str(args.devices), "--key", key, "--org", "1", "--owner", "1",
                 "--username", "backend", "--password-file", str(STATE / "backend-password")],
                env=env,
            )  # fmt: skip
        return daemon.wait()
    except KeyboardInterrupt:
        daemon.send_signal(signal.SIGTERM)
        return daemon.wait()
    finally:
        if sim is not None:
            sim.terminate()
        broker.terminate()
        broker.wait()


if __name__ == "__main__":
    sys.exit(main())
