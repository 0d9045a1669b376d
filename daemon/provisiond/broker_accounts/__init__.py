"""Devices' own broker accounts: issued with the provision token, revoked on decommission.

The rest of the daemon sees only the `BrokerAccounts` protocol below; which
broker holds the accounts is the backend's business (`[broker_accounts]
backend`):

- `none`: accounts are managed elsewhere; provision replies carry no `mqtt`.
- `mosquitto-dynsec`: mosquitto 2's dynamic-security plugin, driven with JSON
  commands on `$CONTROL/dynamic-security/v1` (see `dynsec.py`).

A device's account moves through two roles: *pending* (may only call
`device/activate` and read its own replies) from provisioning until
activation, *active* afterwards. Re-provisioning gives it a new password and
the pending role again; decommissioning deletes it, which also disconnects it.

Passwords exist in clear only in the `MqttCredentials` handed to the reply
(and so in the sealed replay record); the broker stores a salted hash. They
are never logged: `MqttCredentials.__repr__` hides them, and the errors here
carry command names and the broker's own error text, never a command body.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from provisiond.config import Config
from provisiond.errors import Unavailable

# 24 bytes from `secrets`, base64url: 192 bits, 32 characters that need no
# escaping in any MQTT client's config.
PASSWORD_BYTES = 24


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


@dataclass(frozen=True)
class MqttCredentials:
    """What a device needs to connect as itself (the `mqtt` object of a provision reply)."""

    username: str
    password: str = field(repr=False)
    host: str
    port: int
    tls_port: int

    def reply(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "password": self.password,
            "host": self.host,
            "port": self.port,
            "tls_port": self.tls_port,
        }


class BrokerAccountsUnavailable(Unavailable):
    """The broker could not be asked (down, not answering): nothing was changed by us."""

    code = "broker_accounts_unavailable"

    def __init__(self, message: str, *, operation: str, reason: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.reason = reason


class BrokerRefused(BrokerAccountsUnavailable):
    """The broker answered a command with an error (e.g. the daemon lacks the admin role)."""

    code = "broker_refused"

    def __init__(self, *, operation: str, command: str, error: str) -> None:
        super().__init__(
            f"broker refused {command} while {operation}: {error}",
            operation=operation,
            reason=error,
        )
        self.command = command
        self.error = error


class BrokerAccounts(Protocol):
    """Device accounts on the broker. Every method is idempotent where it can be."""

    @property
    def enabled(self) -> bool:
        """False for `none`: callers then skip the account steps altogether."""
        ...

    def username(self, device_id: int) -> str: ...

    async def create(self, device_id: int) -> MqttCredentials:
        """A new account with a new password and the pending role.

        Raises `BrokerAccountsUnavailable` having left nothing behind (or only
        what `sync` removes: a half-made account of a device that has no row).
        """
        ...

    async def rotate(self, device_id: int) -> MqttCredentials:
        """Re-provision: a new password and the pending role; the old password
        stops working at once and a connected device is disconnected. Creates
        the account if it is missing (a decommissioned device coming back)."""
        ...

    async def activate(self, device_id: int) -> None:
        """Switch to the active role, without disconnecting the device."""
        ...

    async def delete(self, device_id: int) -> None:
        """Remove the account (absent is fine); a connected device is disconnected."""
        ...

    async def list_accounts(self) -> AccountList:
        """Every account and role name the broker holds (for `sync`)."""
        ...

    async def apply(self, plan: SyncPlan) -> None:
        """`sync --apply`: delete what no device owns, make what a live device lacks."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class AccountList:
    clients: frozenset[str]
    roles: frozenset[str]


@dataclass(frozen=True)
class Repair:
    """A live device's missing account and/or role, to be made."""

    device_id: int
    active: bool
    create_role: bool
    create_client: bool


@dataclass(frozen=True)
class SyncPlan:
    delete_clients: list[str]
    delete_roles: list[str]
    repairs: list[Repair]

    @property
    def empty(self) -> bool:
        return not (self.delete_clients or self.delete_roles or self.repairs)


class NoAccounts:
    """`backend = "none"`: accounts are managed elsewhere; nothing to do here."""

    enabled = False

    def __init__(self, config: Config) -> None:
        self._prefix = config.broker_accounts.username_prefix

    def username(self, device_id: int) -> str:
        return f"{self._prefix}{device_id}"

    async def create(self, device_id: int) -> MqttCredentials:
        raise NotImplementedError("broker_accounts.backend is none")

    async def rotate(self, device_id: int) -> MqttCredentials:
        raise NotImplementedError("broker_accounts.backend is none")

    async def activate(self, device_id: int) -> None:
        return None

    async def delete(self, device_id: int) -> None:
        return None

    async def list_accounts(self) -> AccountList:
        return AccountList(frozenset(), frozenset())

    async def apply(self, plan: SyncPlan) -> None:
        return None

    async def close(self) -> None:
        return None


def make_backend(config: Config, *, name: str = "accounts") -> BrokerAccounts:
    """`name`: what the broker connection is called (`<mqtt.client_id>-<name>`)."""
    if config.broker_accounts.backend == "mosquitto-dynsec":
        from provisiond.broker_accounts.dynsec import MosquittoDynsec

        return MosquittoDynsec(config, name=name)
    return NoAccounts(config)
