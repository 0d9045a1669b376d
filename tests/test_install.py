"""`pip install .` with no extras is a daemon that runs: no MQTT client libraries, no bumble
(on a PostgreSQL store, `pip install '.[postgresql]'`: the driver, still nothing else).

The simulator, the tests and the client library need aiomqtt and paho, the
BLE bridge needs bumble; `provisiond run` needs none of them. This builds
the wheel into a fresh venv, as an operator would install it, and starts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_proc import write_toml

from support import Broker, make_config

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]


def test_a_plain_install_runs_the_daemon_without_optional_packages(
    tmp_path: Path, broker: Broker
) -> None:
    config = make_config(tmp_path, broker)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # A PostgreSQL store needs its driver, the `postgresql` extra, and nothing else.
    project = f"{ROOT}[postgresql]" if config.store.url else str(ROOT)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", project],
        check=True,
        timeout=600,
    )
    for module in ("aiomqtt", "paho", "bumble"):
        probe = subprocess.run(
            [str(python), "-c", f"import {module}"], check=False, capture_output=True
        )
        assert probe.returncode != 0, f"{module} is installed by a plain `pip install .`"
    if not config.store.url:
        # Without the extra, a PostgreSQL store is refused as a config error that says
        # what to install (exit 3, so systemd does not restart it), not a traceback.
        pg_file = tmp_path / "pg.toml"
        pg_file.write_text('[store]\nurl = "postgresql://provisiond@127.0.0.1:1/provisiond"\n')
        refused = subprocess.run(
            [str(venv / "bin" / "provisiond"), "check-config", "-c", str(pg_file)],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 3, refused.stderr
        assert "store.url" in refused.stderr and "provisiond[postgresql]" in refused.stderr
        assert "Traceback" not in refused.stderr

    config_file = write_toml(config, tmp_path / "provisiond.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    env.pop("PYTHONPATH", None)
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [str(venv / "bin" / "provisiond"), "run", "-c", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if '"daemon.ready"' in line:
                break
        assert any('"daemon.ready"' in line for line in lines), "".join(lines[-20:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
