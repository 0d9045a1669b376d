"""Run provisiond against a mosquitto it starts itself, with a demo API key.

State lives in ./demo-state (delete it to start over). Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
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
    (STATE / "mosquitto.conf").write_text(
        f"listener {args.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        f"persistence true\npersistence_location {STATE}/\n"
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
provisiond demo — broker on 127.0.0.1:{args.port}, state in {STATE}
Demo API key (shown once; a new one is made each run):

    {key}

Try, in another terminal:

    mosquitto_rr -V 5 -p {args.port} -t provisiond/rpc/keys/whoami -e demo/replies \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{}}'

    mosquitto_rr -V 5 -p {args.port} -t provisiond/rpc/provision/token -e demo/replies \\
      -D PUBLISH user-property authorization "Bearer {key}" -m '{{"orgId": 1, "ownerId": 1}}'

Watch presence and events:  mosquitto_sub -p {args.port} -t 'provisiond/#' -v
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
        if args.devices > 0 and (ROOT / "tools" / "provisiond_sim").exists():
            time.sleep(1.5)
            sim = subprocess.Popen(
                [sys.executable, "-m", "provisiond_sim", "--port", str(args.port),
                 "--devices", str(args.devices), "--key", key, "--org", "1", "--owner", "1"],
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
