"""systemd integration: the unit file, and sd_notify as systemd would receive it.

The daemon runs as a real `provisiond run` subprocess against the session's
mosquitto, with NOTIFY_SOCKET pointing at a datagram socket this test owns.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import structlog.testing
from daemon_proc import NotifySocket, daemon_process, write_toml

from provisiond.config import Config
from provisiond.systemd import make_notifier, watchdog_interval
from support import RpcClient, seed_key

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "provisiond.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# --- the unit file


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart aimed at this venv's provisiond (verify checks it exists)."""
    provisiond = Path(sys.executable).parent / "provisiond"
    if not provisiond.exists():
        pytest.skip(f"{provisiond} is not installed (pip install -e .), and verify needs ExecStart")
    text = UNIT.read_text()
    assert "ExecStart=/opt/provisiond/bin/provisiond " in text
    unit = tmp_path / "provisiond.service"
    unit.write_text(text.replace("/opt/provisiond/bin/provisiond", str(provisiond)))
    return unit


def _analyze(*argv: str) -> subprocess.CompletedProcess[str]:
    if SYSTEMD_ANALYZE is None:
        pytest.skip(
            "systemd-analyze is not installed (scripts/setup.sh installs the systemd package)"
        )
    return subprocess.run(
        [SYSTEMD_ANALYZE, *argv], capture_output=True, text=True, timeout=60, check=False
    )


def test_unit_verifies(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    result = _analyze("verify", str(unit))
    # verify exits 0 even for unknown keys (it only warns), so any output is a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_unit_with_ble_dropin_verifies(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    dropins = tmp_path / "provisiond.service.d"
    dropins.mkdir()
    shutil.copy(ROOT / "systemd" / "provisiond-ble.conf", dropins / "ble.conf")
    result = _analyze("verify", str(unit))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_unit_hardening_exposure(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    # Exposure is 0..10 ("OK" below ~2.5); --threshold takes it times ten.
    result = _analyze("security", "--offline=yes", "--threshold=25", "--no-pager", str(unit))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert re.search(r"Overall exposure level for provisiond\.service: [0-2]\.\d", result.stdout)


def test_unit_declares_what_operations_rely_on() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "RestartPreventExitStatus=3",
        "StateDirectory=provisiond",
        "ConfigurationDirectory=provisiond",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_BLUETOOTH",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+s$", text, re.M)
    assert re.search(r"^LoadCredential=mqtt-password:", text, re.M)


# --- sd_notify helpers in-process


def test_watchdog_interval_is_half_and_only_for_this_process() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": pid}) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "nonsense"}) is None
    assert watchdog_interval({}) is None


async def test_notifier_is_a_noop_without_notify_socket() -> None:
    make_notifier({})("READY=1")  # nothing to assert but that it does not raise


# --- the real process


async def test_ready_after_subscriptions_then_stopping_on_sigterm(
    config: Config, tmp_path: Path
) -> None:
    _key_id, secret = seed_key(config, scopes=("devices:read",))
    config_file = write_toml(config, tmp_path / "provisiond.toml", log={"format": "json"})
    notify = NotifySocket()
    notify.start()
    # Connected before the daemon starts, so a request can go out the moment READY=1 arrives.
    async with RpcClient(config) as rpc, daemon_process(config_file, notify) as daemon:
        try:
            ready = await notify.wait_for("READY=1")
        except TimeoutError:
            pytest.fail(f"no READY=1; daemon output:\n{daemon.tail()}")
        # The daemon's client id is new to the broker: a request published
        # before its subscription existed would have reached nobody.
        reply = await rpc.call("keys/whoami", key=secret, timeout=5)
        assert reply["status"] == 200

        lines = [line for _t, line in notify.lines()]
        assert any(line.startswith("STATUS=connecting to") for line in lines[:ready])
        assert "STATUS=serving" in lines[ready:]
        # Connected and subscribed strictly before READY=1.
        connected = daemon.named("mqtt.connected")
        assert connected and connected[0]["subscriptions"] >= 1
        assert not any(line.startswith("WATCHDOG=") for line in lines)  # not asked for

        daemon.signal(signal.SIGTERM)
        await notify.wait_for("STOPPING=1", after=ready, timeout=10)
        assert await daemon.wait(timeout=15) == 0, daemon.tail()
    notify.close()
    assert daemon.named("daemon.stopped")
    assert not daemon.named("mqtt.disconnected")  # a clean DISCONNECT, not a dropped link
    assert secret not in "\n".join(daemon.output)


async def test_watchdog_cadence_over_abstract_socket(config: Config, tmp_path: Path) -> None:
    config_file = write_toml(config, tmp_path / "provisiond.toml", log={"format": "json"})
    notify = NotifySocket(abstract=True)
    assert notify.address.startswith("@")
    notify.start()
    async with daemon_process(config_file, notify, WATCHDOG_USEC="1000000") as daemon:
        try:
            await notify.wait_for("READY=1")
        except TimeoutError:
            pytest.fail(f"no READY=1 on the abstract socket; daemon output:\n{daemon.tail()}")
        first = await notify.wait_for("WATCHDOG=1")
        await notify.wait_for(
            lambda line: (
                line == "WATCHDOG=1"
                and sum(1 for _t, x in notify.lines() if x == "WATCHDOG=1") >= 8
            ),
            after=first,
            timeout=10,
        )
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0, daemon.tail()
    times = [t for t, line in notify.lines() if line == "WATCHDOG=1"]
    notify.close()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Half of WATCHDOG_USEC=1000000 µs: every 0.5 s, never late enough to trip systemd (1 s).
    assert 0.42 <= statistics.median(gaps) <= 0.65, gaps
    assert max(gaps[:7]) < 1.0, gaps


def test_a_refused_subscription_is_not_ready() -> None:
    """READY=1 follows SUBACKs; a SUBACK that refuses, or grants less QoS than asked,
    counts as a failed connection attempt."""
    from provisiond.transport import SubscribeRefused, Subscription, check_granted

    sub = Subscription("p/rpc/#", 1)
    check_granted([sub], [1])  # granted QoS 1
    with (
        structlog.testing.capture_logs() as logged,
        pytest.raises(SubscribeRefused, match="refused the subscription to p/rpc/#"),
    ):
        check_granted([sub], [0x87])
    assert logged == [
        {
            "event": "mqtt.subscribe_refused",
            "topic": "p/rpc/#",
            "reason": "not authorized (0x87)",
            "log_level": "error",
        }
    ]
    with structlog.testing.capture_logs(), pytest.raises(SubscribeRefused):
        check_granted([sub], (0x80,))
    # Downgraded to QoS 0 (mosquitto `max_qos 0`, an ACL): requests would be lost.
    with structlog.testing.capture_logs() as logged, pytest.raises(SubscribeRefused) as refused:
        check_granted([Subscription("p/x", 0), sub], (0, 0))
    assert (refused.value.topic, refused.value.asked, refused.value.granted) == ("p/rpc/#", 1, 0)
    assert [e["event"] for e in logged] == ["mqtt.subscribe_downgraded"]
