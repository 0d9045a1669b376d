"""Broker accounts (mosquitto dynamic-security): what the account step costs, and sync at scale.

`python -m bench broker_accounts [--quick]` (10 000 devices; --quick: 2 000).

The broker's state file is written directly with N device accounts (each with
its own role, as the daemon makes them) and the store with N active devices,
so the figures are taken at that size without creating them one by one
first (mosquitto 2.0's plugin rewrites its whole JSON file on every change,
so building 10k accounts through the API takes tens of minutes).

Figures:
- `provision/token`, one request at a time, without the account step
  (backend none) and with it, on an empty broker and at N accounts;
- `broker-accounts sync` at N: dry run with nothing to do, and `--apply`
  with 100 stale and 100 missing accounts;
- one role per device (what 2.0 needs: no `%u` in dynsec ACLs) against one
  shared role (what a later mosquitto would allow): cost of one more account
  and the size of the file the plugin rewrites on each change.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    MOSQUITTO,
    ROOT,
    daemon_process,
    free_port,
    report,
    rpc_load,
    seed,
    wait_port,
    wait_rpc_ready,
    workdir,
)

PREFIX = "bench"
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
DAEMON_PASSWORD = "bench-daemon-" + uuid.uuid4().hex


def _hash(password: str, iterations: int = 101) -> dict[str, Any]:
    salt = uuid.uuid4().bytes[:12]
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def write_state(path: Path, n: int, *, per_device_roles: bool) -> None:
    sys.path.insert(0, str(ROOT / "daemon"))
    from provisiond.broker_accounts.dynsec import active_acls

    template = json.loads((ROOT / "config" / "mosquitto" / "dynamic-security.json").read_text())
    template = json.loads(json.dumps(template).replace('"provisiond/', f'"{PREFIX}/'))
    clients = [c for c in template["clients"] if c["username"] == "provisiond"]
    clients[0].update(_hash(DAEMON_PASSWORD))
    roles = template["roles"]
    # The load driver's reply topics are outside the prefix (bench/common.rpc_load).
    next(r for r in roles if r["rolename"] == "provisiond-daemon")["acls"].append(
        {"acltype": "publishClientSend", "topic": "bench-replies/#", "allow": True}
    )
    # The load driver connects anonymously: it may call the API and read replies.
    roles.append(
        {
            "rolename": "bench-driver",
            "acls": [
                {"acltype": "publishClientSend", "topic": f"{PREFIX}/rpc/#", "allow": True},
                {"acltype": "subscribePattern", "topic": "bench-replies/#", "allow": True},
                {"acltype": "publishClientReceive", "topic": "bench-replies/#", "allow": True},
            ],
        }
    )
    device_hash = _hash("device-password-" + uuid.uuid4().hex)
    if not per_device_roles:
        roles.append({"rolename": "devices", "acls": active_acls(PREFIX, 0)})
    for i in range(1, n + 1):
        name = f"device-{i}"
        role = name if per_device_roles else "devices"
        clients.append(
            {
                "username": name,
                "roles": [{"rolename": role}, {"rolename": "provisiond-device"}],
                **device_hash,
            }
        )
        if per_device_roles:
            roles.append({"rolename": name, "acls": active_acls(PREFIX, i)})
    template["clients"] = clients
    template["groups"] = [{"groupname": "anonymous", "roles": [{"rolename": "bench-driver"}]}]
    template["anonymousGroup"] = "anonymous"
    path.write_text(json.dumps(template))


@contextlib.contextmanager
def dynsec_broker(directory: Path, state: Path) -> Iterator[int]:
    port = free_port()
    conf = directory / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        f"plugin {PLUGIN}\nplugin_opt_config_file {state}\n"
        "max_inflight_messages 0\nmax_queued_messages 100000\nuser root\n"
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)],
        stdout=(directory / "mosquitto.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc, timeout=60)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def seed_devices(directory: Path, n: int) -> str:
    key = seed(directory, users=1)
    from provisiond.store import connect

    db = connect(directory / "provisiond.db")
    now = time.time()
    with db.conn:
        db.conn.executemany(
            "INSERT INTO devices (id, org_id, owner_id, state, created_at, activated_at)"
            " VALUES (?, 1, 1, 'active', ?, ?)",
            [(i, now, now) for i in range(1, n + 1)],
        )
    db.conn.close()
    return key


def daemon_config(directory: Path, port: int, backend: str, tag: str) -> Path:
    (directory / "mqtt-password").write_text(DAEMON_PASSWORD)
    path = directory / f"provisiond-{tag}.toml"
    path.write_text(
        '[log]\nlevel = "warning"\nformat = "json"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopic_prefix = "{PREFIX}"\n'
        f'client_id = "provisiond-bench-{tag}"\nusername = "provisiond"\n'
        f'password_file = "{directory / "mqtt-password"}"\n'
        f'[store]\npath = "{directory / "provisiond.db"}"\n'
        f'[broker_accounts]\nbackend = "{backend}"\nsync_at_start = false\ntimeout_seconds = 30\n'
    )
    return path


async def provision_latency(
    directory: Path, port: int, key: str, backend: str, n: int, tag: str
) -> dict[str, Any]:
    config = daemon_config(directory, port, backend, tag)
    with daemon_process(config, directory / f"daemon-{tag}.log"):
        await wait_rpc_ready(port, f"{PREFIX}/rpc/keys/whoami", key)
        result = await rpc_load(
            port,
            f"{PREFIX}/rpc/provision/token",
            {"orgId": 1, "ownerId": 1},
            key=key,
            n=n,
            concurrency=1,
            warmup=3,
            timeout=600,
        )
    return result.summary()


async def timed_commands(port: int, commands: list[list[dict[str, Any]]]) -> list[float]:
    """Each inner list sent as one message on the daemon's account; ms per message."""
    from provisiond import mqtt

    client = mqtt.Client(
        "127.0.0.1", port, username="provisiond", password=DAEMON_PASSWORD.encode()
    )
    times: list[float] = []
    async with client:
        await client.subscribe("$CONTROL/dynamic-security/v1/response", qos=1)
        for batch in commands:
            started = time.perf_counter()
            await client.publish(
                "$CONTROL/dynamic-security/v1", json.dumps({"commands": batch}).encode(), qos=1
            )
            async with asyncio.timeout(120):
                async for message in client.messages():
                    client.ack(message)
                    break
            times.append((time.perf_counter() - started) * 1000)
    return times


async def sync_figures(directory: Path, port: int, n: int) -> dict[str, Any]:
    from provisiond.broker_accounts import make_backend
    from provisiond.broker_accounts.sync import sync
    from provisiond.config import load
    from provisiond.store import connect

    config = load(daemon_config(directory, port, "mosquitto-dynsec", "sync"))
    db = connect(directory / "provisiond.db")

    async def store_call(fn: Any) -> Any:
        return fn(db)

    accounts = make_backend(config, name="accounts-bench")
    try:
        started = time.perf_counter()
        dry = await sync(accounts, store_call, prefix="device-", now=time.time(), apply=False)
        dry_s = time.perf_counter() - started
        assert dry.plan.empty, dry.summary()
        # Drift: 100 accounts of live devices lost, 100 accounts of no device.
        drift = [{"command": "deleteClient", "username": f"device-{i}"} for i in range(1, 101)]
        drift += [{"command": "createClient", "username": f"device-{n + i}"} for i in range(1, 101)]
        await timed_commands(port, [drift])
        started = time.perf_counter()
        fixed = await sync(accounts, store_call, prefix="device-", now=time.time(), apply=True)
        apply_s = time.perf_counter() - started
        summary = fixed.summary()
        assert summary["create"] == 100 and summary["delete_clients"] == 100, summary
        again = await sync(accounts, store_call, prefix="device-", now=time.time(), apply=False)
        assert again.plan.empty
    finally:
        await accounts.close()
        db.conn.close()
    return {
        "devices": n,
        "dry_run_no_drift_s": round(dry_s, 3),
        "apply_100_stale_100_missing_s": round(apply_s, 2),
    }


async def one_more_account(port: int, n: int, *, per_device_role: bool, count: int) -> float:
    from provisiond.broker_accounts.dynsec import pending_acls

    batches = []
    for i in range(n + 1000, n + 1000 + count):
        name = f"device-{i}"
        if per_device_role:
            batches.append(
                [
                    {"command": "createRole", "rolename": name, "acls": pending_acls(PREFIX, i)},
                    {
                        "command": "createClient",
                        "username": name,
                        "password": "p" * 32,
                        "roles": [{"rolename": name}, {"rolename": "provisiond-device"}],
                    },
                ]
            )
        else:
            batches.append(
                [
                    {
                        "command": "createClient",
                        "username": name,
                        "password": "p" * 32,
                        "roles": [{"rolename": "devices"}, {"rolename": "provisiond-device"}],
                    }
                ]
            )
    times = await timed_commands(port, batches)
    return round(statistics.median(times), 1)


def main(*, quick: bool = False) -> dict[str, Any]:
    n = 2_000 if quick else 10_000
    figures: dict[str, Any] = {"devices": n}
    with workdir() as d:
        sys.path.insert(0, str(ROOT / "daemon"))
        empty = d / "empty"
        empty.mkdir()
        write_state(empty / "dynsec.json", 0, per_device_roles=True)
        key0 = seed_devices(empty, 0)
        with dynsec_broker(empty, empty / "dynsec.json") as port:
            figures["provision_without_account_empty"] = asyncio.run(
                provision_latency(empty, port, key0, "none", 100, "none0")
            )
            figures["provision_with_account_empty"] = asyncio.run(
                provision_latency(empty, port, key0, "mosquitto-dynsec", 100, "dynsec0")
            )

        full = d / "full"
        full.mkdir()
        write_state(full / "dynsec.json", n, per_device_roles=True)
        key = seed_devices(full, n)
        figures["state_file_bytes_role_per_device"] = (full / "dynsec.json").stat().st_size
        with dynsec_broker(full, full / "dynsec.json") as port:
            # Sync first: the provisions without accounts below are drift to it.
            figures["sync"] = asyncio.run(sync_figures(full, port, n))
            figures["provision_without_account_at_n"] = asyncio.run(
                provision_latency(full, port, key, "none", 50, "none")
            )
            figures["provision_with_account_at_n"] = asyncio.run(
                provision_latency(full, port, key, "mosquitto-dynsec", 20, "dynsec")
            )
            figures["one_more_account_role_per_device_ms"] = asyncio.run(
                one_more_account(port, n, per_device_role=True, count=10)
            )

        shared = d / "shared"
        shared.mkdir()
        write_state(shared / "dynsec.json", n, per_device_roles=False)
        figures["state_file_bytes_shared_role"] = (shared / "dynsec.json").stat().st_size
        with dynsec_broker(shared, shared / "dynsec.json") as port:
            figures["one_more_account_shared_role_ms"] = asyncio.run(
                one_more_account(port, n, per_device_role=False, count=10)
            )
    return report("broker_accounts", figures)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
