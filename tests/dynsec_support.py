"""The shipped dynamic-security broker config (config/mosquitto/) run as-is by the tests.

Only what cannot be shipped is rewritten: file locations (→ a temp dir) and
the two ports (free loopback ports). The plugin's state file is made from the
shipped template with `init-dynsec`'s code, as an operator would, plus one
test-only admin account (`testadmin`) that lets a test break and repair the
daemon's own rights from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
from mosquitto_proc import MosquittoProcess
from tls_support import write_tls

from provisiond import mqtt
from provisiond.broker_accounts.bootstrap import init_dynsec
from provisiond.config import Config
from support import (
    BROKER_PASSWORDS,
    RpcClient,
    free_port,
    make_config,
    remember_password,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "mosquitto"
PREFIX = "provisiond"  # the shipped roles are written for the default prefix
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"

__all__ = ["BROKER_PASSWORDS", "remember_password"]

PASSWORDS = {
    "provisiond": remember_password("daemon-pw-" + uuid.uuid4().hex[:12]),
    "backend": remember_password("backend-pw-" + uuid.uuid4().hex[:12]),
    "testadmin": remember_password("admin-pw-" + uuid.uuid4().hex[:12]),
}


class DynsecBroker(MosquittoProcess):
    def __init__(self, directory: Path, *, device_ca: Path | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.local_port = free_port()
        self.port = self.local_port  # what support.make_config reads
        self.tls_port = free_port()
        # With the shipped (commented) certificate listener switched on.
        self.device_ca = device_ca
        self.cert_port = free_port()
        self.state = directory / "dynamic-security.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self._prepared = False

    def _prepare(self) -> None:
        d = self.directory
        write_tls(d / "certs")
        template = json.loads((SHIPPED / "dynamic-security.json").read_text())
        template["clients"].append(
            {"username": "testadmin", "roles": [{"rolename": "dynsec-admin"}]}
        )
        (d / "template.json").write_text(json.dumps(template))
        init_dynsec(d / "template.json", self.state, PASSWORDS)
        conf = (SHIPPED / "provisiond.conf").read_text()
        for old, new in (
            ("/var/lib/mosquitto/", f"{d}/"),
            ("/etc/mosquitto/", f"{d}/"),
            ("listener 1883 127.0.0.1\n", f"listener {self.local_port} 127.0.0.1\n"),
            ("listener 8883\n", f"listener {self.tls_port} 127.0.0.1\n"),
        ):
            # A rewrite that matches nothing means the shipped file changed shape.
            assert old in conf, f"shipped provisiond.conf no longer contains {old!r}"
            conf = conf.replace(old, new)
        assert f"plugin {PLUGIN}\n" in conf
        if self.device_ca is not None:
            conf = _enable_certificate_listener(conf, self.cert_port, self.device_ca)
        # As root, mosquitto would switch to the `mosquitto` user, who cannot
        # read this test's private temp dir; on a gateway the files are its own.
        extra = f"log_dest file {d}/mosquitto.log\nuser {getpass.getuser()}\n"
        (d / "mosquitto.conf").write_text(conf + extra)
        self._prepared = True

    def start(self) -> DynsecBroker:
        if not self._prepared:
            self._prepare()
        self.launch("dynsec", stderr_mode="ab")
        return self

    def stop(self) -> None:
        super().stop()
        self.proc = None

    def config(self, tmp_path: Path, **sections: dict[str, Any]) -> Config:
        """The daemon on its shipped account, managing device accounts in this broker."""
        (tmp_path / "mqtt-password").write_text(PASSWORDS["provisiond"] + "\n")
        mqtt_section = {
            "topic_prefix": PREFIX,
            "username": "provisiond",
            "password_file": str(tmp_path / "mqtt-password"),
            **sections.pop("mqtt", {}),
        }
        accounts = {
            "backend": "mosquitto-dynsec",
            "host": "localhost",
            "port": self.local_port,
            "tls_port": self.tls_port,
            "timeout_seconds": 2.0,
            **sections.pop("broker_accounts", {}),
        }
        return make_config(
            tmp_path,
            self,  # type: ignore[arg-type]  # only .port is read
            mqtt=mqtt_section,
            broker_accounts=accounts,
            **sections,
        )

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.directory / "certs" / "ca.crt"))

    def device(
        self, creds: dict[str, Any], *, tls: bool = False, client_id: str = ""
    ) -> mqtt.Client:
        """A device's connection with the credentials it was issued (not yet connected)."""
        return mqtt.Client(
            "localhost" if tls else "127.0.0.1",
            creds["tls_port"] if tls else creds["port"],
            client_id=client_id or f"dev-{uuid.uuid4().hex[:8]}",
            username=creds["username"],
            password=creds["password"].encode(),
            tls=self.tls_context() if tls else None,
            connect_timeout=5,
        )

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[Admin]:
        client = mqtt.Client(
            "127.0.0.1",
            self.local_port,
            client_id=f"testadmin-{uuid.uuid4().hex[:6]}",
            username="testadmin",
            password=PASSWORDS["testadmin"].encode(),
        )
        async with client:
            granted = await client.subscribe("$CONTROL/dynamic-security/v1/response")
            assert granted[0] < 0x80
            yield Admin(client)

    def stored_clients(self) -> dict[str, dict[str, Any]]:
        """The plugin's state file as it is on disk now (once the plugin finished writing it)."""
        # The plugin truncates the file and writes it again, not atomically: a
        # read can land in between and see nothing, or half of it.
        for _ in range(100):
            try:
                doc = json.loads(self.state.read_text())
            except json.JSONDecodeError:
                time.sleep(0.01)
                continue
            return {c["username"]: c for c in doc["clients"]}
        raise AssertionError(f"{self.state} never held a whole JSON document")


def _enable_certificate_listener(conf: str, port: int, device_ca: Path) -> str:
    """Uncomment the shipped certificate listener, on a free port and the test's CA folder."""
    head, marker, block = conf.partition("# --- devices with a client certificate")
    assert marker, "shipped provisiond.conf has no certificate listener block"
    lines = [
        line[1:] if line.startswith("#") and line[1:2].isalpha() else line
        for line in block.splitlines()
    ]
    block = "\n".join(lines) + "\n"
    for old, new in (
        ("listener 8884\n", f"listener {port} 127.0.0.1\n"),
        ("/var/lib/provisiond/device_ca/", f"{device_ca}/"),
    ):
        assert old in block, f"shipped certificate listener no longer contains {old!r}"
        block = block.replace(old, new)
    return head + marker + block


class Admin:
    def __init__(self, client: mqtt.Client) -> None:
        self.client = client

    async def __call__(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        # Every admin reads every answer (the daemon's too): keep only ours.
        corr = uuid.uuid4().hex
        sent = [{**c, "correlationData": f"{corr}-{i}"} for i, c in enumerate(commands)]
        await self.client.publish(
            "$CONTROL/dynamic-security/v1", json.dumps({"commands": sent}).encode(), qos=1
        )
        async with asyncio.timeout(5):
            async for message in self.client.messages():
                self.client.ack(message)
                result: list[dict[str, Any]] = json.loads(message.payload)["responses"]
                if result and str(result[0].get("correlationData", "")).startswith(corr):
                    return result
        raise AssertionError("no response")

    async def clients(self) -> set[str]:
        (response,) = await self(
            {"command": "listClients", "verbose": False, "count": -1, "offset": 0}
        )
        return set(response["data"]["clients"])


class ServiceRpc(RpcClient):
    """RpcClient on the shipped `backend` service account (replies under its own topic)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.reply_topic = f"{PREFIX}/replies/backend/{uuid.uuid4().hex}"

    async def __aenter__(self) -> ServiceRpc:
        self._client = aiomqtt.Client(
            "127.0.0.1",
            self.config.mqtt.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            username="backend",
            password=PASSWORDS["backend"],
        )
        await self._client.__aenter__()
        await self._client.subscribe(self.reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self


async def device_call(
    client: mqtt.Client, device_id: int, operation: str, body: dict[str, Any]
) -> dict[str, Any]:
    """A device's own RPC: reply to its own replies topic, read on its own connection."""
    topic = f"{PREFIX}/devices/{device_id}/replies/{uuid.uuid4().hex[:8]}"
    granted = await client.subscribe(topic, qos=1)
    assert granted[0] < 0x80, f"device may not read its replies: {granted}"
    correlation = uuid.uuid4().bytes
    await client.publish(
        f"{PREFIX}/rpc/{operation}",
        json.dumps(body).encode(),
        qos=1,
        response_topic=topic,
        correlation_data=correlation,
    )
    async with asyncio.timeout(10):
        async for message in client.messages():
            client.ack(message)
            if message.correlation_data == correlation:
                reply: dict[str, Any] = json.loads(message.payload)
                return reply
    raise AssertionError("connection ended before the reply")
