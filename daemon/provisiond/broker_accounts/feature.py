"""Wiring of broker accounts into the running daemon, and the provisioning steps that use them.

`setup` provides a `BrokerIdentity` (the backend, the per-device locks, the
device CA) as the service BROKER_ACCOUNTS, closes it at stop, and runs
`sync` in the background at start. The ordering rules the
provisioning operations follow:

- `provision_with_account`: reserve the id → make the account → commit the
  device, token and reply (replay record) in one transaction. The broker
  refusing or unreachable is a 503 with no row and no token; a failed commit
  deletes the account again; a crash in between leaves an account of a
  reserved id, which `sync` deletes once the reservation is stale.
- re-provision (`accounts.rotate`): new password and the pending role *before* the
  new token is committed. The old password stops working right then (and a
  connected device is disconnected): re-provisioning is what an operator does
  when a device is reset, handed over or suspected compromised, and its old
  credentials must not outlive its old token, which is revoked at the same
  moment. If the commit then fails, the device holds neither; the 503 says
  so, and a retry issues both.
- activation (`accounts.activate`): the role switch to active happens before the token is
  spent, so a broker that is down fails activation with the token intact.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import sqlite_utils

from provisiond.broker_accounts import (
    BrokerAccounts,
    BrokerAccountsUnavailable,
    MqttCredentials,
    certificates,
    make_backend,
)
from provisiond.broker_accounts import store as account_store
from provisiond.broker_accounts.certificates import DeviceCA
from provisiond.broker_accounts.sync import sync
from provisiond.errors import BadRequest, StoreUnavailable
from provisiond.keyvault import keys_in_store
from provisiond.logs import get_logger
from provisiond.rpc import Router
from provisiond.runtime.app import App
from provisiond.runtime.services import ServiceKey

log = get_logger("provisiond.broker_accounts")

# On a shared store: how often a daemon looks for revocations made through others.
CRL_POLL_SECONDS = 5.0

R = TypeVar("R")


class DeviceLocks:
    """One account change per device at a time in this process.

    Two re-provisions of one device racing could otherwise commit the token
    of one and leave the broker with the password of the other.
    """

    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}
        self._users: dict[int, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, device_id: int) -> AsyncIterator[None]:
        lock = self._locks.setdefault(device_id, asyncio.Lock())
        self._users[device_id] = self._users.get(device_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[device_id] -= 1
            if not self._users[device_id]:
                del self._users[device_id]
                del self._locks[device_id]


@dataclass(frozen=True)
class IssuedCertificate:
    pem: str
    serial: int
    ca_pem: str

    def record(self, db: sqlite_utils.Database, device_id: int, now: float) -> None:
        certificates.record(db, device_id=device_id, serial=self.serial, now=now)

    def reply(self) -> dict[str, str]:
        return {"certificate": self.pem, "ca_certificate": self.ca_pem}


class BrokerIdentity:
    """The devices' own broker identities in a running daemon."""

    def __init__(self, app: App, accounts: BrokerAccounts) -> None:
        self._app = app
        self.backend = accounts
        self.ca: DeviceCA | None = None
        self._locks = DeviceLocks()
        # How many revocations the CRL file written last holds.
        self._crl_revoked = -1

    @property
    def accounts(self) -> BrokerAccounts | None:
        """The backend when accounts are managed here; None for `none`."""
        return self.backend if self.backend.enabled else None

    def lock(self, device_id: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Held around a device's broker step and store commit (re-provision, decommission)."""
        return self._locks.hold(device_id)

    async def provision(
        self,
        accounts: BrokerAccounts,
        write: Callable[[Callable[[sqlite_utils.Database], R]], Awaitable[R]],
        *,
        check: Callable[[sqlite_utils.Database], None],
        commit: Callable[[sqlite_utils.Database, int, MqttCredentials], R],
    ) -> R:
        """Reserve an id, make its account, then `write(commit)` the device and token.

        `check(db)` refuses before anything is made; `commit(db, device_id,
        creds)` inserts the device row with the reserved id and returns the
        result. A failed commit deletes the account and the reservation again.
        """
        store, now = self._app.store, self._app.clock.now()

        def reserve(db: sqlite_utils.Database) -> int:
            check(db)
            return account_store.reserve_device_id(db, now=now)

        device_id = await store.write(reserve)
        try:
            creds = await accounts.create(device_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await store.write(lambda db: account_store.release(db, device_id))
            raise
        try:
            return await write(lambda db: commit(db, device_id, creds))
        except BaseException:
            await _undo(accounts, device_id)
            with contextlib.suppress(Exception):
                await store.write(lambda db: account_store.release(db, device_id))
            raise

    async def sign_csr(self, device_id: int, csr: str) -> IssuedCertificate:
        """Activation with a CSR: the certificate for the device's username (certificates.py)."""
        if self.ca is None:
            raise BadRequest(
                "certificates are not enabled here (broker_accounts.certificates)",
                code="certificates_disabled",
                field="csr",
            )
        pem, serial = await asyncio.to_thread(self.ca.sign, csr, self.backend.username(device_id))
        return IssuedCertificate(pem, serial, self.ca.cert_pem)

    async def refresh_crl(self) -> None:
        """After a revocation was committed: the CRL file again (the broker reads it on reload)."""
        if self.ca is None:
            return
        serials = await self._app.store.call(certificates.revoked_serials)
        await asyncio.to_thread(self.ca.write_crl, serials)
        self._crl_revoked = len(serials)
        log.info("broker_accounts.crl_written", revoked=len(serials), path=str(self.ca.crl_path))

    async def follow_crl(self) -> None:
        """On a shared store: revocations made through other daemons reach this host's CRL."""
        while True:
            await asyncio.sleep(CRL_POLL_SECONDS)
            try:
                # Revocations are only ever added: a count that moved means a new one.
                revoked = await self._app.store.call(certificates.revoked_count)
                if revoked != self._crl_revoked:
                    await self.refresh_crl()
            except StoreUnavailable:
                continue
            except Exception:
                # Keep following: a dead loop would leave revoked certificates accepted.
                log.exception("broker_accounts.crl_follow_failed")

    async def start(self) -> None:
        config = self._app.config
        if config.broker_accounts.certificates:
            name = f"provisiond device CA ({config.daemon.gateway_id})"
            self.ca = await certificates.open_ca(
                self._app.store, config, name=name, now=self._app.clock.now()
            )
            await self.refresh_crl()
            if keys_in_store(config):
                self._app.spawn(self.follow_crl(), name="broker-accounts-crl")
        accounts = self.accounts
        if accounts is not None and config.broker_accounts.sync_at_start:
            self._app.spawn(_sync_at_start(self._app, accounts), name="broker-accounts-sync")


# The devices' broker identities; provided whatever the backend (`none` included).
BROKER_ACCOUNTS: ServiceKey[BrokerIdentity] = ServiceKey("broker_accounts")


async def _undo(accounts: BrokerAccounts, device_id: int) -> None:
    # Shielded: a cancelled request must still not leave an account behind.
    # If the broker is gone too, sync removes it later (the reservation stays).
    try:
        await asyncio.shield(accounts.delete(device_id))
    except (BrokerAccountsUnavailable, asyncio.CancelledError) as exc:
        log.warning("broker_accounts.undo_failed", device=device_id, error=str(exc))


def setup(app: App, _router: Router) -> None:
    """Device broker accounts per `[broker_accounts]`; provides BROKER_ACCOUNTS."""
    identity = BrokerIdentity(app, make_backend(app.config))
    app.services.provide(BROKER_ACCOUNTS, identity)
    app.on_start.append(identity.start)
    app.on_stop.append(identity.backend.close)


async def _sync_at_start(app: App, accounts: BrokerAccounts) -> None:
    # The daemon's own connection comes up first; a sync that finds the broker
    # unreachable tries again a few times, then leaves it to the operator.
    for attempt in range(5):
        try:
            result = await sync(
                accounts,
                app.store.call,
                prefix=app.config.broker_accounts.username_prefix,
                now=app.clock.now(),
                apply=True,
            )
        except BrokerAccountsUnavailable as exc:
            log.warning("broker_accounts.sync_failed", error=exc.message, attempt=attempt + 1)
            await asyncio.sleep(2.0 * (attempt + 1))
            continue
        if result.plan.empty:
            log.info("broker_accounts.in_sync")
        return
