"""Prometheus metrics: real HTTP scrapes of a daemon that served real traffic."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import test_ble_bridge
from daemon_proc import ROOT, daemon_process, write_toml
from prometheus_client.parser import text_string_to_metric_families
from provision_support import device_public_key, org_key
from structlog.testing import LogCapture
from test_systemd import _analyze, _unit_copy

from provisiond.client import ProvisiondClient, RpcError
from provisiond.config import Config, load
from provisiond.errors import ConfigError
from provisiond.metrics import HTTP_TIMEOUT, MAX_CONNECTIONS, systemd_socket
from support import (
    SECRETS,
    Broker,
    RpcClient,
    free_port,
    make_config,
    remember_secret,
    running,
)

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store


def scrape(listen: str, path: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://{listen}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape_or_none(listen: str) -> int | None:
    try:
        return scrape(listen)[0]
    except (ConnectionError, urllib.error.URLError):
        return None


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value; also proves the text parses as Prometheus format."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def metrics_config(tmp_path: Path, broker: Broker) -> tuple[Config, str]:
    listen = f"127.0.0.1:{free_port()}"
    return make_config(tmp_path, broker, metrics={"listen": listen}), listen


async def test_scrape_after_traffic(tmp_path: Path, broker: Broker, logs: LogCapture) -> None:
    config, listen = metrics_config(tmp_path, broker)
    key = org_key(config)
    async with (
        running(config),
        ProvisiondClient(
            "127.0.0.1", config.mqtt.port, key=key, prefix=config.mqtt.topic_prefix
        ) as c,
    ):
        await c.keys_whoami()
        with pytest.raises(RpcError):
            await c.device_get(424242)
        created = await c.provision_token(org_id=1, owner_id=10)
        token = remember_secret(created["token"])
        device_id = created["deviceId"]
        await c.device_activate(token=token, capabilities=2, public_key=device_public_key())
        grant = await c.wifi_config_grant(device_id)
        remember_secret(grant["session_key"])
        queued = await c.provision_reconfigure(device_id)
        assert queued["deviceIsOffline"] is True
        reply = await c.call("no-such/op-7f3a", {})
        assert reply.status == 404
        async with RpcClient(config) as raw:
            # A device heartbeats: online, and its queued command is sent.
            await raw.client.publish(
                f"{config.mqtt.topic_prefix}/devices/{device_id}/heartbeat", b"{}"
            )
            for _ in range(100):
                if (await c.device_get(device_id))["presence"]["online"]:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the queued command goes out

        status, text = await asyncio.to_thread(scrape, listen)
    assert status == 200
    found = samples(text)
    assert 'provisiond_requests_total{op="keys/whoami",status="200"} 1.0' in text
    assert value(found, "provisiond_requests_total", op="device/get", status="404") == 1
    assert value(found, "provisiond_requests_total", op="unknown", status="404") == 1
    assert "no-such" not in text
    assert (
        value(found, "provisiond_request_duration_seconds_count", op="keys/whoami", status="200")
        == 1
    )
    assert value(found, "provisiond_presence_tracked_devices") == 1
    assert value(found, "provisiond_presence_online_devices") == 1
    assert value(found, "provisiond_presence_offline_devices") == 0
    assert value(found, "provisiond_heartbeats_total", result="ok") == 1
    assert value(found, "provisiond_commands_sent_total") == 1
    assert value(found, "provisiond_commands", state="sent") == 1
    assert value(found, "provisiond_commands", state="queued") == 0
    assert value(found, "provisiond_mqtt_connected") == 1
    assert value(found, "provisiond_mqtt_reconnects_total") == 0
    assert value(found, "provisiond_dropped_messages_total", reason="no_reply_path") == 0
    assert value(found, "provisiond_wifi_grants_total", mode="server") == 1
    assert (value(found, "provisiond_store_duration_seconds_count") or 0) > 5
    assert (value(found, "process_resident_memory_bytes") or 0) > 0

    # The documentation lists exactly what a scrape shows, and the dashboard uses only those.
    documented = set(
        re.findall(r"^\| `(provisiond_\w+)`", (ROOT / "docs/metrics.md").read_text(), re.M)
    )
    served = set(re.findall(r"^# HELP (provisiond_\w+) ", text, re.M))
    assert documented == served
    dashboard = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", n)
        for e in exprs
        for n in re.findall(r"provisiond_\w+", e)
    }
    assert used and used <= served

    # Never a secret: not the key, not the token, not the session key, nor part of one.
    for secret in (key, token, grant["session_key"], *SECRETS):
        # Parts of longer ones too (SECRETS also holds short test passwords).
        if len(secret) >= 8:
            assert secret not in text and (len(secret) < 24 or secret[8:24] not in text)
    assert "sk_live_" not in text and "password" not in text.lower()


async def test_queued_commands_and_disconnected_broker(
    tmp_path: Path, own_broker: Broker, logs: LogCapture
) -> None:
    config, listen = metrics_config(tmp_path, own_broker)
    key = org_key(config)
    async with running(config):
        async with ProvisiondClient(
            "127.0.0.1", config.mqtt.port, key=key, prefix=config.mqtt.topic_prefix
        ) as c:
            created = await c.provision_token(org_id=1, owner_id=10)
            remember_secret(created["token"])
            await c.device_activate(
                token=created["token"], capabilities=2, public_key=device_public_key()
            )
            await c.provision_reconfigure(created["deviceId"])
        found = samples((await asyncio.to_thread(scrape, listen))[1])
        assert value(found, "provisiond_commands", state="queued") == 1
        assert value(found, "provisiond_presence_offline_devices") == 1

        own_broker.kill()
        await asyncio.sleep(0.5)
        found = samples((await asyncio.to_thread(scrape, listen))[1])
        assert value(found, "provisiond_mqtt_connected") == 0
        own_broker.start()
        await asyncio.sleep(3)
        found = samples((await asyncio.to_thread(scrape, listen))[1])
        assert value(found, "provisiond_mqtt_connected") == 1
        assert value(found, "provisiond_mqtt_reconnects_total") == 1


async def test_ble_upload_outcomes(
    tmp_path: Path, broker: Broker, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    listen = f"127.0.0.1:{free_port()}"

    def with_metrics(*args: Any, **sections: Any) -> Config:
        return make_config(*args, metrics={"listen": listen}, **sections)

    monkeypatch.setattr(test_ble_bridge, "make_config", with_metrics)
    async with test_ble_bridge.ble_env(tmp_path, broker) as env:
        dev = await env.device()
        assert (await env.upload(dev.device_id))["body"]["state"] == "connected"
        failed = await env.upload(dev.device_id, password=test_ble_bridge.WRONG)
        assert failed["body"]["state"] == "failed"
        assert (await env.upload(999_999))["status"] == 404
        status, text = await asyncio.to_thread(scrape, listen)
    assert status == 200
    found = samples(text)
    assert value(found, "provisiond_ble_uploads_total", outcome="connected") == 1
    assert value(found, "provisiond_ble_uploads_total", outcome="failed") == 1
    assert value(found, "provisiond_ble_uploads_total", outcome="device_not_found") == 1
    assert test_ble_bridge.PASSWORD not in text and test_ble_bridge.WRONG not in text


async def test_only_get_metrics(tmp_path: Path, broker: Broker, logs: LogCapture) -> None:
    config, listen = metrics_config(tmp_path, broker)
    async with running(config):
        assert (await asyncio.to_thread(scrape, listen, "/"))[0] == 404
        assert (await asyncio.to_thread(scrape, listen, "/metrics", "POST"))[0] == 405
        # Clients that send nothing hold at most MAX_CONNECTIONS slots, for at
        # most HTTP_TIMEOUT; then scrapes work again.
        host, port = listen.split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(MAX_CONNECTIONS + 3)]
        await asyncio.sleep(0.2)
        assert (await asyncio.to_thread(scrape_or_none, listen)) is None
        await asyncio.sleep(HTTP_TIMEOUT + 0.5)
        status, _text = await asyncio.to_thread(scrape, listen)
        assert status == 200
        for sock in idle:
            sock.close()


async def test_off_by_default(config: Config, logs: LogCapture) -> None:
    assert config.metrics.listen == ""
    async with running(config) as server:
        assert server.app is not None and "metrics" not in server.app.services


def test_listen_is_validated(tmp_path: Path) -> None:
    for bad in ("9108", "localhost", ":9108", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:x"):
        path = tmp_path / "m.toml"
        path.write_text(f'[metrics]\nlisten = "{bad}"\n')
        with pytest.raises(ConfigError) as caught:
            load(path, env={})
        assert caught.value.key == "metrics.listen", bad
    for good in ("127.0.0.1:9108", "[::1]:9108", "localhost:9108", "0.0.0.0:9108"):
        path.write_text(f'[metrics]\nlisten = "{good}"\n')
        assert load(path, env={}).metrics.listen == good
    assert load(None, env={"PROVISIOND_METRICS_LISTEN": "127.0.0.1:9"}).metrics.listen


async def test_port_in_use_is_a_config_error(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tmp_path, broker, metrics={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(ConfigError) as caught:
            async with running(config):
                pass
        assert caught.value.key == "metrics.listen"


async def test_real_process_serves_metrics(tmp_path: Path, broker: Broker) -> None:
    config, listen = metrics_config(tmp_path, broker)
    config_file = write_toml(config, tmp_path / "p.toml", log={"format": "json"})
    async with daemon_process(config_file) as daemon:
        await daemon.wait_event("daemon.ready", timeout=30)
        assert daemon.named("metrics.listening")[0]["listen"] == listen
        status, text = await asyncio.to_thread(scrape, listen)
        assert status == 200 and "provisiond_mqtt_connected 1.0" in text
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(30) == 0


def test_systemd_socket_is_only_ours() -> None:
    base = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "metrics"}
    assert systemd_socket({**base, "LISTEN_PID": str(os.getpid() + 1)}) is None
    assert (
        systemd_socket({**base, "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "other"}) is None
    )
    assert systemd_socket({}) is None


async def test_systemd_socket_activation(tmp_path: Path, broker: Broker) -> None:
    """As systemd starts it with provisiond-metrics.socket: fd 3 named `metrics`,
    LISTEN_PID the daemon's own pid, and no `[metrics] listen` in the config."""
    config = make_config(tmp_path, broker, log={"format": "json"})
    assert config.metrics.listen == ""
    config_file = write_toml(config, tmp_path / "p.toml")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    listen = f"127.0.0.1:{held.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    env.update(
        PYTHONPATH=f"{ROOT / 'daemon'}:{ROOT / 'plugins'}",
        LISTEN_FDS="1",
        LISTEN_FDNAMES="metrics",
    )
    # bash puts the socket on fd 3 and sets LISTEN_PID to its own pid, which
    # `exec` hands to the daemon: what systemd does between fork and exec.
    wrapper = f'export LISTEN_PID=$$; exec 3<&{held.fileno()}; exec "$@"'
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", wrapper, "bash", sys.executable, "-m", "provisiond", "run",
        "-c", str(config_file), env=env, pass_fds=(held.fileno(),),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    held.close()  # the daemon holds it now, as systemd would
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while '"daemon.ready"' not in (lines[-1] if lines else ""):
                lines.append((await proc.stdout.readline()).decode())
                assert lines[-1], "".join(lines)
        listening = [json.loads(line) for line in lines if '"metrics.listening"' in line]
        assert [(e["listen"], e.get("systemd_socket")) for e in listening] == [(listen, True)]
        status, text = await asyncio.to_thread(scrape, listen)
        assert status == 200 and "provisiond_mqtt_connected 1.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, "".join(lines)


def test_socket_unit_verifies(tmp_path: Path) -> None:
    _unit_copy(tmp_path)  # the service it names, beside it
    shutil.copy(ROOT / "systemd" / "provisiond-metrics.socket", tmp_path)
    result = _analyze("verify", str(tmp_path / "provisiond-metrics.socket"))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
    text = (ROOT / "systemd" / "provisiond-metrics.socket").read_text()
    assert "FileDescriptorName=metrics\n" in text and "Service=provisiond.service\n" in text


async def test_reload_keeps_the_listener(tmp_path: Path, broker: Broker, logs: LogCapture) -> None:
    config, listen = metrics_config(tmp_path, broker)
    async with running(config) as server:
        moved = config.model_copy(
            update={"metrics": config.metrics.model_copy(update={"listen": "127.0.0.1:1"})}
        )
        assert await server.reload(moved)
        warned = [e for e in logs.entries if e["event"] == "config.needs_restart"]
        assert warned and warned[-1]["keys"] == ["metrics.listen"] and warned[-1]["kept"] == listen
        assert (await asyncio.to_thread(scrape, listen))[0] == 200
