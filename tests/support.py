"""Test helpers: a real mosquitto, a daemon in-process, and an RPC client.

Every test gets its own topic prefix and client ids, so tests sharing one
broker never see each other's messages or sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest
import sqlite_utils
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.typing import EventDict

from provisiond import auth
from provisiond.config import Config
from provisiond.rpc import Body, Operation, Request, Router
from provisiond.runtime.app import App
from provisiond.runtime.features import Feature
from provisiond.schema import all_migrations
from provisiond.server import Server
from provisiond.store import migrate, open_database, store_target

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# Every secret the suite creates or receives; tests/leakcheck.py asserts that
# none of them appears in any log line or event of the whole session.
SECRETS: set[str] = set()


# Every log event of every in-process daemon in the session (see leakcheck.py).
LOG_EVENTS: list[str] = []

# Devices' broker passwords the suite was issued, and every store file a test
# config names: leakcheck.py asserts no store file holds one in clear (the
# sealed replay record holds them encrypted).
BROKER_PASSWORDS: set[str] = set()
STORE_FILES: set[str] = set()
# The same for the databases `--store postgresql` made for daemons that issue
# devices' broker passwords (`[broker_accounts] backend = "mosquitto-dynsec"`):
# no other store can hold one, and reading all of them would take seconds.
STORE_URLS: set[str] = set()


Test = TypeVar("Test", bound=Callable[..., Any])


def log_sink(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
    LOG_EVENTS.append(repr(event_dict))
    return event_dict


def remember_secret(value: str) -> str:
    SECRETS.add(value)
    return value


def remember_password(value: str) -> str:
    BROKER_PASSWORDS.add(value)
    return remember_secret(value)


async def eventually(
    check: Callable[[], object], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Wait until `check()` is truthy (for effects that follow a reply, like its log line)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto process on a loopback port, with persistence for session tests."""

    def __init__(self, directory: Path, port: int | None = None, extra: str = "") -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        self.db = directory / "mosquitto.db"

    def persisted(self) -> bool:
        """True if the broker wrote its database and never failed to (see `start`)."""
        log = self.log.read_text() if self.log.exists() else ""
        return self.db.exists() and self.db.stat().st_size > 0 and "Error saving" not in log

    def start(self) -> Broker:
        # Started as root, mosquitto switches to the `mosquitto` user, who cannot
        # write this test's directory: every save failed ("Permission denied")
        # and a restart silently lost every session. Stay the user we are.
        user = "" if "\nuser " in f"\n{self.extra}" else f"user {getpass.getuser()}\n"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "max_queued_messages 200000\n"
            "max_inflight_messages 0\n"
            f"{user}"
            f"{self.extra}\n"
        )
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# The daemon's MQTT backend for the whole run: `--mqtt-client aiomqtt` (or this
# variable) runs the suites on the compatibility backend. Not PROVISIOND_*: that
# prefix is the daemon's own config override namespace.
MQTT_CLIENT_ENV = "PVD_TEST_MQTT_CLIENT"


def mqtt_client() -> str:
    return os.environ.get(MQTT_CLIENT_ENV) or "native"


def make_config(
    tmp_path: Path, broker: Broker, *, uses_store: bool = True, **sections: dict[str, Any]
) -> Config:
    """A config for one test: its own store (file or database), topic prefix and client id.

    `uses_store=False`: for a part that never opens the store (the transport
    alone): no database is made, and the test needs no `store` mark."""
    tag = uuid.uuid4().hex[:10]
    raw: dict[str, Any] = {
        "mqtt": {
            "client": mqtt_client(),
            "host": "127.0.0.1",
            "port": broker.port,
            "topic_prefix": f"t{tag}",
            "client_id": f"provisiond-{tag}",
            "session_expiry_seconds": 300,
            "reconnect_min_seconds": 0.1,
            "reconnect_max_seconds": 1.0,
        },
        "store": {"path": str(tmp_path / f"store-{tag}.db")},
        "daemon": {"shutdown_grace_seconds": 5},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    if uses_store:
        _check_marked()
        if "url" not in sections.get("store", {}):
            # A test that names its store (e.g. a SQLite file on a full disk) keeps it.
            raw["store"].update(_store_url())
    if raw["store"].get("url", "").startswith("postgresql://"):
        # On PostgreSQL the signing keys and the device CA live in the store,
        # sealed under this file's content (docs/scaling.md).
        raw["store"].setdefault("key_encryption_key_file", str(kek_file()))
    STORE_FILES.add(raw["store"]["path"])
    issues_passwords = raw.get("broker_accounts", {}).get("backend") == "mosquitto-dynsec"
    if issues_passwords and raw["store"].get("url", "").startswith("postgresql://"):
        STORE_URLS.add(raw["store"]["url"])
    return Config.model_validate(raw)


def _store_url() -> dict[str, str]:
    """With `--store postgresql`, a fresh database of the session's cluster."""
    import pg_cluster

    if pg_cluster.store_under_test() == "postgresql":
        return {"url": pg_cluster.shared().new_database()}
    return {}


# Whether the running test is marked `store` (set by conftest.py before each
# test). A test that makes a store without the mark would silently be left
# out of the PostgreSQL pass, so making one fails it instead (on both passes).
CURRENT_TEST_MARKED: list[bool] = [True]


def _check_marked() -> None:
    if not CURRENT_TEST_MARKED[0]:
        pytest.fail(
            "this test makes a store but is not marked `store`, so the PostgreSQL pass"
            " would leave it out: add @pytest.mark.store (or the module's"
            " `pytestmark = pytest.mark.store`; see tests/conftest.py)",
            pytrace=False,
        )


def store_toml(config: Config) -> str:
    """The `[store]` table of `config` as TOML, for a config file a test writes by hand
    (a CLI command or a daemon process then uses the test's store, SQLite or PostgreSQL)."""
    store = config.store
    lines = ["[store]", f"path = {json.dumps(store.path)}"]
    for key in ("url", "password_file", "key_encryption_key_file"):
        if getattr(store, key):
            lines.append(f"{key} = {json.dumps(getattr(store, key))}")
    return "\n".join(lines) + "\n"


def new_store_toml(path: Path) -> str:
    """A `[store]` table for a fresh store of the store under test: the SQLite file
    `path`, or with `--store postgresql` a new database (and the session's KEK)."""
    _check_marked()
    store: dict[str, str] = {"path": str(path), **_store_url()}
    if store.get("url"):
        store["key_encryption_key_file"] = str(kek_file())
    STORE_FILES.add(str(path))
    return "[store]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in store.items())


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    """For a test of SQLite itself (its file, PRAGMAs, WAL): the PostgreSQL pass
    skips it with `reason` (tests/conftest.py). It counts as a `store` test."""
    return pytest.mark.sqlite_only(reason=reason)


def file_keys_only() -> pytest.MarkDecorator:
    """For tests of the file key ring: on PostgreSQL the ring lives in the store."""
    import pg_cluster

    return pytest.mark.skipif(
        pg_cluster.store_under_test() == "postgresql",
        reason="on PostgreSQL the signing keys live in the store (tests/test_shared_keys.py)",
    )


_KEK: list[Path] = []


def kek_file() -> Path:
    """The session's key-encryption key file (made on first use; remembered as a secret)."""
    if not _KEK:
        import base64
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="pvd-kek-")) / "kek"
        text = remember_secret(base64.b64encode(os.urandom(32)).decode())
        path.write_text(text + "\n")
        path.chmod(0o600)
        _KEK.append(path)
    return _KEK[0]


def open_db(config: Config) -> sqlite_utils.Database:
    """The test's store (SQLite or PostgreSQL), migrated; SQL as the store functions write it."""
    target, password = store_target(config)
    db = open_database(target, password=password)
    migrate(db, all_migrations())
    return db


def seed_key(
    config: Config,
    *,
    org: int = 1,
    user: int | None = None,
    scopes: tuple[str, ...] = tuple(sorted(auth.SCOPES)),
    permissions: tuple[str, ...] = (),
    users: tuple[int, ...] = (),
) -> tuple[str, str]:
    """Create org (and users) if missing and a key; returns (key_id, secret)."""
    db = open_db(config)
    if not db.execute("SELECT 1 FROM orgs WHERE id = ?", [org]).fetchone():
        auth.create_org(db, org, f"org {org}")
    for uid in {*users, *([user] if user else [])}:
        if not db.execute("SELECT 1 FROM users WHERE id = ?", [uid]).fetchone():
            auth.create_user(db, org, uid)
    key_id, secret = auth.create_key(
        db, org_id=org, user_id=user, scopes=frozenset(scopes), permissions=frozenset(permissions)
    )
    db.conn.close()
    return key_id, remember_secret(secret)


@contextlib.asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Server]:
    server = Server(config, **kwargs)
    task = asyncio.create_task(server.serve())
    ready = asyncio.create_task(server.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    if ready not in done:
        ready.cancel()
        server.request_stop()
        await task
        raise TimeoutError("daemon did not become ready")
    try:
        yield server
    finally:
        server.request_stop()
        await asyncio.wait_for(task, 30)


def cases(names: tuple[str, ...], table: list[Any]) -> Callable[[Test], Test]:
    """One test per row of a table of cases, each named by its first column."""
    mark: Callable[[Test], Test] = pytest.mark.parametrize(
        names, table, ids=[row[0] for row in table]
    )
    return mark


def rows(config: Config, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """What `sql` reads from the daemon's store (SQLite or PostgreSQL), on a connection of its own."""
    db = open_db(config)
    try:
        return [tuple(r) for r in db.execute(sql, list(params)).fetchall()]
    finally:
        db.conn.close()


class RpcClient:
    """An MQTT v5 requester: Response Topic + Correlation Data, Bearer in a user property."""

    def __init__(self, config: Config, *, client_id: str | None = None) -> None:
        self.config = config
        self.prefix = config.mqtt.topic_prefix
        self.reply_topic = f"replies-{uuid.uuid4().hex}"
        self.client_id = client_id or f"rpc-{uuid.uuid4().hex[:12]}"
        self._pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self.unmatched: list[dict[str, Any]] = []

    async def __aenter__(self) -> RpcClient:
        self._client = aiomqtt.Client(
            "127.0.0.1",
            self.config.mqtt.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        await self._client.__aenter__()
        await self._client.subscribe(self.reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self._client:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    @property
    def client(self) -> aiomqtt.Client:
        assert self._client is not None
        return self._client

    async def _read(self) -> None:
        async for message in self.client.messages:
            payload = json.loads(message.payload)  # type: ignore[arg-type]
            _remember(payload)
            corr = getattr(message.properties, "CorrelationData", None)
            fut = self._pending.pop(bytes(corr), None) if corr is not None else None
            if fut is not None and not fut.done():
                fut.set_result(payload)
            else:
                self.unmatched.append(payload)

    async def send(
        self,
        operation: str,
        body: Any = None,
        *,
        key: str | None = None,
        correlation: bytes | None = None,
        raw: bytes | None = None,
        reply: bool = True,
    ) -> asyncio.Future[dict[str, Any]]:
        correlation = correlation if correlation is not None else uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        if reply:
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        if key is not None:
            props.UserProperty = ("authorization", f"Bearer {key}")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = fut
        if body is not None:
            _remember(body)
        payload = raw if raw is not None else json.dumps({} if body is None else body).encode()
        await self.client.publish(
            f"{self.prefix}/rpc/{operation}", payload, qos=1, properties=props
        )
        return fut

    async def call(
        self, operation: str, body: Any = None, *, timeout: float = 10.0, **kwargs: Any
    ) -> dict[str, Any]:
        fut = await self.send(operation, body, **kwargs)
        return await asyncio.wait_for(fut, timeout)


def _remember(body: Any) -> None:
    if isinstance(body, dict):
        for key, value in body.items():
            if key == "mqtt" and isinstance(value, dict) and isinstance(value.get("password"), str):
                remember_password(value["password"])
            if key in ("token", "session_key", "password", "api_key") and isinstance(value, str):
                remember_secret(value)
            else:
                _remember(value)
    elif isinstance(body, list):
        for item in body:
            _remember(item)


class Events:
    """Collects what the daemon publishes under `P/events/<topic_filter>`."""

    def __init__(self, config: Config, topic_filter: str = "#") -> None:
        self.config = config
        self.topic_filter = topic_filter
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[bytes] = []

    async def __aenter__(self) -> Events:
        self.client = aiomqtt.Client(
            "127.0.0.1", self.config.mqtt.port, identifier=f"ev-{uuid.uuid4().hex[:10]}"
        )
        await self.client.__aenter__()
        await self.client.subscribe(
            f"{self.config.mqtt.topic_prefix}/events/{self.topic_filter}", qos=1
        )
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.client.messages:
            payload = bytes(msg.payload)  # type: ignore[arg-type]
            self.raw.append(payload)
            self.items.append((msg.topic.value, json.loads(payload)))

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)


class SlowBody(Body):
    seconds: float


def _slow_setup(_app: App, router: Router) -> None:
    async def slow(_request: Request, body: SlowBody) -> dict[str, float]:
        await asyncio.sleep(body.seconds)
        return {"slept": body.seconds}

    router.register(Operation("test/slow", slow, body=SlowBody))


# `test/slow {"seconds": S}`: a request that certainly stays in flight for S seconds.
SLOW_FEATURE = Feature("slow", _slow_setup)
