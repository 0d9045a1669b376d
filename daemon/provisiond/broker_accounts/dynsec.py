"""The `mosquitto-dynsec` backend: device accounts in mosquitto 2's dynamic-security plugin.

Commands are JSON on `$CONTROL/dynamic-security/v1`, answered on
`.../response`; each command carries a `correlationData` the plugin echoes,
so many requests can share one connection.

**The connection.** A dedicated connection (client id `<mqtt.client_id>-accounts`;
the CLI's `-accounts-cli-<random>`; clean session) on the daemon's own account, which holds the plugin's admin
role. Not the daemon's main connection: that one is a persistent session
whose subscriptions are the RPC router's (every message on it is routed by
topic under `mqtt.topic_prefix`, and `$CONTROL/...` is outside it); a reply
queued in that session across a restart would answer a command nobody waits
for any more; and the CLI (`broker-accounts sync`, `devices decommission`)
needs the very same code without a running daemon. It connects on first use
and again after a loss, so a broker that is down costs a request a fast 503,
not a hang.

**One role per device.** mosquitto 2.0's dynamic-security ACLs match topics
literally: there is no `%u`/`%c` substitution (it came with the `acl_file`
`pattern` lines only; `tests/test_broker_accounts.py` checks that a `%u` ACL
grants nothing on 2.0.11). So each device gets its own role, named like its
account, holding its own topics. Measured in `bench/README.md`.

**Role switches without a disconnect.** `addClientRole`/`removeClientRole`
and `addRoleACL` make mosquitto disconnect the client; `modifyRole` (the
whole ACL list at once) does not. Activation therefore rewrites the device's
own role from pending to active while the device stays connected.
`setClientPassword` and `deleteClient` do disconnect it: that is what a
re-provision and a decommission want.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

from provisiond.broker_accounts import (
    AccountList,
    BrokerAccountsUnavailable,
    BrokerRefused,
    MqttCredentials,
    SyncPlan,
    new_password,
)
from provisiond.config import Config
from provisiond.logs import get_logger
from provisiond.transport import (
    Connection,
    ConnectionLost,
    PublishRefused,
    Subscription,
    TransportError,
    connect_options,
    load_backend,
)

log = get_logger("provisiond.broker_accounts")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
# Commands per message when syncing many accounts. mosquitto 2.0 rewrites its
# whole JSON file after every command (~0.25 s each at 10k devices, see
# bench/README.md), so batching saves round trips, not file writes; the wait
# for a message's answers grows with its command count.
BATCH = 20
# How many commands the plain timeout covers (provisioning sends two).
COMMANDS_PER_TIMEOUT = 2

# mosquitto 2.0 words "not found" both ways, depending on the command.
NOT_FOUND = ("Client not found", "Role not found", "Role does not exist")
EXISTS = ("Client already exists", "Role already exists")


def _acl(acltype: str, topic: str, *, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": priority, "allow": allow}


# Every device account also holds this shared role (shipped in
# config/mosquitto/dynamic-security.json): it refuses `$share/...` outright.
# A member that joins the daemon's share group without read access makes
# mosquitto silently drop that member's share of the requests. Kept out of
# the per-device roles because the plugin rewrites its whole file on every
# change: every byte per device is paid on every provisioning (bench/README.md).
DEVICE_ROLE = "provisiond-device"


def pending_acls(prefix: str, device_id: int) -> list[dict[str, Any]]:
    """Before activation: call `device/activate`, hear its own replies. Nothing else.

    Only subscriptions are listed, not receipt: the shipped default lets a
    client receive what it may subscribe to, and subscribing is denied
    unless a role allows it.
    """
    return [
        _acl("publishClientSend", f"{prefix}/rpc/device/activate"),
        _acl("subscribePattern", f"{prefix}/devices/{device_id}/replies/#"),
    ]


def active_acls(prefix: str, device_id: int) -> list[dict[str, Any]]:
    """After activation: send its own heartbeat, status (also its last will), command
    acks and WiFi status; hear its own commands and replies."""
    own = f"{prefix}/devices/{device_id}"
    return [
        *(
            _acl("publishClientSend", f"{own}/{leaf}")
            for leaf in ("heartbeat", "status", "commands/ack", "wifi/status")
        ),
        _acl("subscribePattern", f"{own}/commands/#"),
        _acl("subscribePattern", f"{own}/replies/#"),
    ]


def _roles(name: str) -> list[dict[str, Any]]:
    return [{"rolename": name}, {"rolename": DEVICE_ROLE}]


class DynsecClient:
    """Sends dynsec commands and waits for their answers, over one lazily made connection."""

    def __init__(self, config: Config, *, name: str = "accounts") -> None:
        self._config = config
        # Client id `<mqtt.client_id>-<name>`: the CLI uses its own, or the
        # broker would take the running daemon's connection over.
        self._client_id = f"{config.mqtt.client_id}-{name}"
        self._timeout = config.broker_accounts.timeout_seconds
        self._conn: Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def _connection(self, operation: str) -> Connection:
        conn = self._conn
        if conn is not None and conn.is_connected:
            return conn
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.is_connected:
                return conn
            # The daemon's own credentials and TLS, read the same way (file reads: a thread).
            options = await connect_options(
                self._config,
                client_id=self._client_id,
                clean_start=True,
                connect_timeout=self._timeout,
            )
            conn = load_backend("native").connection(options, 1)
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.connect()
                    granted = await conn.subscribe([Subscription(RESPONSE_TOPIC, 1)])
            except (TransportError, OSError, TimeoutError) as exc:
                with contextlib.suppress(TransportError, OSError):
                    await conn.disconnect()
                reason = str(exc) or type(exc).__name__
                raise BrokerAccountsUnavailable(
                    f"broker unreachable while {operation}: {reason}",
                    operation=operation,
                    reason=reason,
                ) from None
            if any(code >= 0x80 for code in granted):
                await conn.disconnect()
                raise BrokerRefused(
                    operation=operation,
                    command="subscribe",
                    error=f"may not read {RESPONSE_TOPIC} (no dynamic-security admin role?)",
                )
            self._conn = conn
            self._reader = asyncio.get_running_loop().create_task(self._read(conn))
            return conn

    async def _read(self, conn: Connection) -> None:
        try:
            async for delivery in conn.deliveries():
                conn.ack(delivery)
                try:
                    doc = json.loads(delivery.payload)
                except ValueError:
                    continue
                for response in doc.get("responses", []) if isinstance(doc, dict) else []:
                    corr = response.get("correlationData") if isinstance(response, dict) else None
                    future = self._waiting.pop(corr, None) if isinstance(corr, str) else None
                    if future is not None and not future.done():
                        future.set_result(response)
        except TransportError:
            pass
        finally:
            # Whoever still waits learns now, not at their timeout.
            for corr, future in list(self._waiting.items()):
                if not future.done():
                    future.set_exception(ConnectionLost("broker connection lost"))
                self._waiting.pop(corr, None)

    async def call(self, operation: str, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one message; their responses in order (each may hold "error")."""
        conn = await self._connection(operation)
        loop = asyncio.get_running_loop()
        sent: list[dict[str, Any]] = []
        futures: list[asyncio.Future[dict[str, Any]]] = []
        for command in commands:
            corr = uuid.uuid4().hex
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._waiting[corr] = future
            futures.append(future)
            sent.append({**command, "correlationData": corr})
        timeout = self._timeout * max(1.0, len(commands) / COMMANDS_PER_TIMEOUT)
        try:
            async with asyncio.timeout(timeout):
                await conn.publish(CONTROL_TOPIC, json.dumps({"commands": sent}).encode(), qos=1)
                return [await future for future in futures]
        except PublishRefused as exc:
            raise BrokerRefused(
                operation=operation,
                command=commands[0]["command"] if commands else "?",
                error=f"publish on {CONTROL_TOPIC} refused (0x{exc.reason_code:02x})",
            ) from None
        except TimeoutError:
            raise BrokerAccountsUnavailable(
                f"no answer from the dynamic-security plugin within {timeout:g}s while {operation}",
                operation=operation,
                reason="timeout",
            ) from None
        except TransportError as exc:
            raise BrokerAccountsUnavailable(
                f"broker connection lost while {operation}: {exc}",
                operation=operation,
                reason=str(exc),
            ) from None
        finally:
            for command in sent:
                self._waiting.pop(command["correlationData"], None)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(TransportError, OSError):
                await conn.disconnect()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


def _check(
    operation: str,
    commands: list[dict[str, Any]],
    responses: list[dict[str, Any]],
    *,
    tolerate: tuple[str, ...] = (),
) -> list[str | None]:
    """The error of each response (None: done); raises on any error not tolerated."""
    errors: list[str | None] = []
    for command, response in zip(commands, responses, strict=True):
        error = response.get("error")
        if error is not None and str(error) not in tolerate:
            raise BrokerRefused(operation=operation, command=command["command"], error=str(error))
        errors.append(None if error is None else str(error))
    return errors


class MosquittoDynsec:
    """`BrokerAccounts` on mosquitto's dynamic-security plugin."""

    enabled = True

    def __init__(
        self, config: Config, client: DynsecClient | None = None, *, name: str = "accounts"
    ) -> None:
        ba = config.broker_accounts
        self._prefix = ba.username_prefix
        self._topics = config.mqtt.topic_prefix
        self._host = ba.host or config.mqtt.host
        self._port = ba.port
        self._tls_port = ba.tls_port
        self.client = client or DynsecClient(config, name=name)

    def username(self, device_id: int) -> str:
        return f"{self._prefix}{device_id}"

    def _credentials(self, device_id: int, password: str) -> MqttCredentials:
        return MqttCredentials(
            self.username(device_id), password, self._host, self._port, self._tls_port
        )

    def _role(self, command: str, device_id: int, *, active: bool) -> dict[str, Any]:
        """`command` (createRole, modifyRole) for the device's own role, with the ACLs
        of its state: activation only until it is active, then its whole topic tree."""
        acls = (active_acls if active else pending_acls)(self._topics, device_id)
        return {"command": command, "rolename": self.username(device_id), "acls": acls}

    async def _run(
        self, operation: str, commands: list[dict[str, Any]], *, tolerate: tuple[str, ...] = ()
    ) -> list[str | None]:
        responses = await self.client.call(operation, commands)
        return _check(operation, commands, responses, tolerate=tolerate)

    async def create(self, device_id: int) -> MqttCredentials:
        name = self.username(device_id)
        password = new_password()
        operation = f"creating the account of device {device_id}"
        commands: list[dict[str, Any]] = [
            self._role("createRole", device_id, active=False),
            {
                "command": "createClient",
                "username": name,
                "password": password,
                "roles": _roles(name),
            },
        ]
        responses = await self.client.call(operation, commands)
        try:
            _check(operation, commands, responses)
        except BrokerRefused:
            # Undo only what this call made: a role or account that already
            # existed (hand-made, say) is not ours to delete.
            if responses[0].get("error") is None:
                with contextlib.suppress(BrokerAccountsUnavailable):
                    await self._run(
                        operation, [{"command": "deleteRole", "rolename": name}], tolerate=NOT_FOUND
                    )
            raise
        log.info("broker_accounts.created", device=device_id, username=name)
        return self._credentials(device_id, password)

    async def rotate(self, device_id: int) -> MqttCredentials:
        name = self.username(device_id)
        password = new_password()
        operation = f"re-provisioning the account of device {device_id}"
        # Role first: the disconnect that setClientPassword causes must find
        # the device already limited to activation when it comes back.
        commands: list[dict[str, Any]] = [
            self._role("modifyRole", device_id, active=False),
            {"command": "setClientPassword", "username": name, "password": password},
        ]
        errors = await self._run(operation, commands, tolerate=NOT_FOUND)
        if any(errors):
            # Decommissioned (or never made, or half-deleted): start afresh.
            await self._run(
                operation,
                [
                    {"command": "deleteClient", "username": name},
                    {"command": "deleteRole", "rolename": name},
                ],
                tolerate=NOT_FOUND,
            )
            return await self.create(device_id)
        log.info("broker_accounts.rotated", device=device_id, username=name)
        return self._credentials(device_id, password)

    async def activate(self, device_id: int) -> None:
        name = self.username(device_id)
        command = self._role("modifyRole", device_id, active=True)
        errors = await self._run(
            f"activating the account of device {device_id}", [command], tolerate=NOT_FOUND
        )
        if errors[0] is not None:
            # Provisioned before this backend was on: its account, if any, is
            # managed elsewhere. Activation itself does not depend on it.
            log.warning("broker_accounts.no_role", device=device_id, username=name)

    async def delete(self, device_id: int) -> None:
        name = self.username(device_id)
        await self._run(
            f"deleting the account of device {device_id}",
            [
                {"command": "deleteClient", "username": name},
                {"command": "deleteRole", "rolename": name},
            ],
            tolerate=NOT_FOUND,
        )
        log.info("broker_accounts.deleted", device=device_id, username=name)

    async def list_accounts(self) -> AccountList:
        operation = "listing accounts"
        commands: list[dict[str, Any]] = [
            {"command": "listClients", "verbose": False, "count": -1, "offset": 0},
            {"command": "listRoles", "verbose": False, "count": -1, "offset": 0},
        ]
        responses = await self.client.call(operation, commands)
        _check(operation, commands, responses)
        clients = responses[0].get("data", {}).get("clients", [])
        roles = responses[1].get("data", {}).get("roles", [])
        return AccountList(
            frozenset(str(c) for c in clients if isinstance(c, str)),
            frozenset(str(r) for r in roles if isinstance(r, str)),
        )

    async def apply(self, plan: SyncPlan) -> None:
        commands: list[dict[str, Any]] = [
            {"command": "deleteClient", "username": name} for name in plan.delete_clients
        ]
        commands += [{"command": "deleteRole", "rolename": name} for name in plan.delete_roles]
        for repair in plan.repairs:
            name = self.username(repair.device_id)
            if repair.create_role:
                commands.append(self._role("createRole", repair.device_id, active=repair.active))
            if repair.create_client:
                # No password: nobody could know one. The device connects
                # again once a re-provision gives it credentials.
                commands.append(
                    {"command": "createClient", "username": name, "roles": _roles(name)}
                )
            elif repair.create_role:
                commands.append({"command": "addClientRole", "username": name, "rolename": name})
        for start in range(0, len(commands), BATCH):
            # Tolerant: a device provisioned or decommissioned meanwhile has
            # already done what this step would.
            await self._run(
                "syncing accounts", commands[start : start + BATCH], tolerate=NOT_FOUND + EXISTS
            )

    async def close(self) -> None:
        await self.client.close()
