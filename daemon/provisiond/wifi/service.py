"""The daemon's grant service: who may get a grant, signing keys, consumed grants.

`provisiond.wifi.signing` knows how to sign; this module decides whether to,
with which key, and remembers what devices report back. The WiFi feature
(`provisiond.ops.wifi`) provides it as the service GRANTS; the BLE bridge
plugin asks it `grantable` and `issue_for` in-process (bridge mode).

Grants themselves are stateless: nothing is written when one is issued. The
only table is `consumed_grants`, the jtis devices reported as used, kept until
their `exp` so the bridge never offers one again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, Required, TypedDict, Unpack

import sqlite_utils

from provisiond import permissions
from provisiond.auth import Principal
from provisiond.clock import iso_utc
from provisiond.config import Config, read_secret, resolve_path
from provisiond.devices import Device, find_device
from provisiond.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    NotFound,
    StoreUnavailable,
    Unavailable,
)
from provisiond.keyvault import KeyEncryptionKey, keys_in_store, load_kek
from provisiond.logs import get_logger
from provisiond.runtime.app import App
from provisiond.runtime.services import ServiceKey
from provisiond.store import Migration
from provisiond.wifi import keystore
from provisiond.wifi.crypto import MAX_GRANT_LIFETIME, b64url_encode
from provisiond.wifi.keystore import StoredRing
from provisiond.wifi.signing import (
    AlgorithmUnavailable,
    DeviceNotWifiCapable,
    InvalidGrantRequest,
    IssuedGrant,
    KeyRing,
    KeyRingError,
    hs256_device_jwk,
    issue_grant,
)

log = get_logger("provisiond.wifi")

MIGRATIONS: list[Migration] = [
    Migration(
        "wifi-1-consumed-grants",
        """
        CREATE TABLE consumed_grants (
            jti TEXT PRIMARY KEY,
            device_id INTEGER NOT NULL,
            exp INTEGER NOT NULL,
            state TEXT NOT NULL,
            consumed_at REAL NOT NULL
        );
        CREATE INDEX consumed_grants_exp ON consumed_grants(exp);
        """,
    ),
]

# Grants issued by this process, remembered only to know a reported jti's
# exp (and device). Bounded: an evicted jti falls back to now + the maximum
# lifetime, which keeps a consumed record longer than needed, never shorter.
MAX_ISSUED_MEMORY: Final = 65_536
PRUNE_INTERVAL_SECONDS: Final = 60.0
MIN_HS256_SECRET: Final = 32

Mode = Literal["e2e", "server"]


class GrantRequest(TypedDict, total=False):
    """The keyword arguments of `GrantService.issue`, for `issue_reply` to pass on."""

    org_id: Required[int]
    device_id: Required[int]
    principal: Principal | None
    expires_in: int | None
    app_public_key: bytes | None
    device_nonce: bytes | None


@dataclass(frozen=True)
class GrantResult:
    """One issued grant, as the RPC reply and the BLE bridge need it."""

    grant_blob: str
    jti: str
    # The bridge waits for a newer second than the last grant's before the next
    # (devices refuse a stale iat), so it needs this without parsing the blob.
    iat: int
    exp: int
    expires_at: str
    # The grant's `epk` claim: what the uploader's ephemeral key must match.
    epk: bytes
    device_public_key: bytes
    # Only in server-generated mode; out of repr so it cannot reach a log line.
    session_key: bytes | None = field(repr=False)
    # "e2e" covers bridge mode too: the daemon cannot tell (and need not) who
    # holds the private half of an app_public_key.
    mode: Mode


@dataclass(frozen=True)
class _Keys:
    """What signs, decided at start and on reload (and, for a stored ring, on refresh)."""

    algorithm: str
    ring: KeyRing | StoredRing | None
    hs256_master: bytes | None = field(repr=False)
    # Set when the ring lives in the store (PostgreSQL), to unseal what it re-reads.
    kek: KeyEncryptionKey | None = field(default=None, repr=False)


class GrantService:
    """Issue grants and keep the consumed-grant ledger for one daemon."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._keys: _Keys | None = None
        self._issued: OrderedDict[str, tuple[int, int]] = OrderedDict()  # jti -> (device, exp)
        # A stored ring: what the table looked like when last read, and when
        # (monotonic) the last read succeeded.
        self._version: tuple[tuple[Any, ...], ...] = ()
        self._refreshed = 0.0
        self._signing_kid: str | None = None

    # ---- keys

    async def load_keys(self) -> None:
        """Load or create the signing keys (disk I/O, so off the event loop)."""
        await self.reload_keys(self.app.config)
        if keys_in_store(self.app.config):
            self.app.spawn(self.refresh_forever(), name="wifi-keys-refresh")

    async def reload_keys(self, config: Config) -> None:
        """(Re)load the signing keys: at start, and on SIGHUP, so that after
        `keys rotate-signing` on a file ring the new key signs from then on. A
        failure raises, which refuses the reload and keeps the keys in memory."""
        if _stored_ring(config):
            keys = await self._load_stored(config)
        else:
            keys = await asyncio.to_thread(_load_keys, config, self.app.clock.now())
        old = self._keys
        self._keys = keys
        old_kid = None if old is None or old.ring is None else old.ring.active.kid
        new_kid = None if keys.ring is None else keys.ring.active.kid
        self._signing_kid = new_kid
        if old is None or old.algorithm != keys.algorithm or old_kid != new_kid:
            log.info(
                "wifi.keys_loaded",
                algorithm=keys.algorithm,
                kid=new_kid,
                previous_kid=old_kid,
                verification_keys=0 if keys.ring is None else len(keys.ring.keys),
                source="store" if keys.kek is not None else "files",
            )

    async def _load_stored(self, config: Config) -> _Keys:
        """The store's ring, made (or imported from the file ring) if it has none."""
        kek = await asyncio.to_thread(
            load_kek, config, why="the grant signing keys live in the store"
        )
        files = await asyncio.to_thread(_file_ring, config)
        alg, now = config.wifi.signing_algorithm, self.app.clock.now()
        propagation = config.wifi.key_propagation_seconds
        done = await self.app.store.write(
            lambda db: keystore.ensure(
                db, kek, alg, now=now, propagation=propagation, import_from=files
            )
        )
        version, stored = await self.app.store.call(
            lambda db: (keystore.version(db), keystore.load(db, kek))
        )
        self._version, self._refreshed = version, self.app.clock.monotonic()
        kids = [k.key.kid for k in stored]
        if done is not None:
            log.info(f"wifi.keys_{done}", kids=kids)
        elif files is not None and files.active.kid not in kids:
            # The store was filled by another daemon first: these files are not
            # what the fleet signs with, and devices that pinned them need re-provisioning.
            log.warning("wifi.key_files_not_imported", directory=str(keys_directory(config)))
        return _Keys(alg, StoredRing(stored, clock=self.app.clock.now), None, kek)

    async def refresh_forever(self) -> None:
        """Re-read a stored ring until cancelled, so rotations by any host reach this one."""
        while True:
            propagation = self.app.config.wifi.key_propagation_seconds
            await asyncio.sleep(keystore.refresh_interval(propagation))
            try:
                await self.refresh()
            except StoreUnavailable:
                pass
            except ConfigError as exc:
                # E.g. a row sealed under another KEK: keep what we have; the
                # staleness bound stops this daemon before it could mislead.
                log.error("wifi.keys_refresh_failed", error=str(exc))
            except Exception:
                # Keep trying: a dead loop would leave this daemon stale for good.
                log.exception("wifi.keys_refresh_failed")

    async def refresh(self) -> None:
        """Read the stored ring again if it changed (a no-op for file rings)."""
        keys = self._keys
        if keys is None or keys.kek is None:
            return
        kek, seen = keys.kek, self._version

        def read(db: sqlite_utils.Database) -> tuple[Any, list[keystore.StoredKey] | None]:
            current = keystore.version(db)
            return current, None if current == seen else keystore.load(db, kek)

        version, stored = await self.app.store.call(read)
        self._refreshed = self.app.clock.monotonic()
        if stored is not None and self._keys is keys:
            self._version = version
            self._keys = replace(keys, ring=StoredRing(stored, clock=self.app.clock.now))
            log.info("wifi.keys_refreshed", kids=[k.key.kid for k in stored])
        ring = self._keys.ring if self._keys is not None else None
        if ring is not None and ring.active.kid != self._signing_kid:
            log.info("wifi.keys_signing", kid=ring.active.kid, previous_kid=self._signing_kid)
            self._signing_kid = ring.active.kid

    @property
    def keyring(self) -> KeyRing | StoredRing | None:
        """The asymmetric key ring (None in HS256 mode); for rotation and tests."""
        return None if self._keys is None else self._keys.ring

    def _require_keys(self) -> _Keys:
        if self._keys is None:
            raise Unavailable("grant signing keys are not loaded yet", code="keys_unavailable")
        if self._keys.kek is not None:
            age = self.app.clock.monotonic() - self._refreshed
            bound = keystore.stale_after(self.app.config.wifi.key_propagation_seconds)
            if age > bound:
                # Another daemon may sign with a key added since: neither sign
                # nor publish until the store answers again.
                raise Unavailable(
                    f"grant signing keys not refreshed from the store for {age:.0f} s",
                    code="keys_stale",
                )
        return self._keys

    def verification_jwks(self, device_id: int) -> list[dict[str, Any]]:
        """The JWKs a device should pin to verify its grants.

        EdDSA/ES256: the gateway's public keys that still verify, active first.
        HS256: the device's own derived `oct` key — a secret, for that device's
        activation reply only, never for a published list.
        """
        keys = self._require_keys()
        if keys.algorithm == "HS256":
            assert keys.hs256_master is not None
            return [hs256_device_jwk(keys.hs256_master, device_id)]
        return self.public_jwks()

    def public_jwks(self) -> list[dict[str, Any]]:
        """Public verification keys (what `wifi-config/keys` publishes)."""
        ring = self._require_keys().ring
        return [] if ring is None else ring.verification_jwks(self.app.clock.now())

    # ---- issue

    async def issue(
        self,
        *,
        org_id: int,
        device_id: int,
        principal: Principal | None = None,
        expires_in: int | None = None,
        app_public_key: bytes | None = None,
        device_nonce: bytes | None = None,
    ) -> GrantResult:
        """Sign a grant for `device_id` in `org_id`, or raise an errors.py exception.

        `principal` is the API key of an RPC caller; in-process callers (the
        BLE bridge) pass None and are trusted for `org_id`. A user-scoped key
        needs OWN_DEVICES_VIEW on its own devices or ORG_DEVICES_VIEW — the
        same device rules as docs/protocol.md §4 gives reconfigure, applied here too.

        The device comes from the app's device cache, read from the store
        only on a miss. The signing runs on the event loop: it is a fixed,
        small amount of work (an Ed25519 or ES256 signature, and one or two
        X25519 operations, about 0.1 ms in all), cheaper than the two thread
        switches it would take to run it elsewhere.
        """
        device = await self.grantable(org_id=org_id, device_id=device_id, principal=principal)
        return self.issue_for(
            device, expires_in=expires_in, app_public_key=app_public_key, device_nonce=device_nonce
        )

    async def grantable(
        self, *, org_id: int, device_id: int, principal: Principal | None = None
    ) -> Device:
        """The device, if the caller may have a grant for it and it can take one.

        The one place a grant is refused for the device's sake (unknown, another
        organisation's, not the caller's, not activated, not WiFi-capable); the
        BLE bridge asks it before any radio traffic, then signs with `issue_for`.
        """
        if principal is not None:
            if principal.org_id != org_id:
                # A key never reaches another organisation's devices, nor learns they exist.
                raise NotFound(
                    f"device {device_id} not found", code="device_not_found", field="device_id"
                )
            permissions.check_device_view(principal)
        self._require_keys()
        device = await self._device(device_id, org_id)
        if principal is not None:
            permissions.check_owner(principal, device)
        require_grantable(device)
        return device

    def issue_for(
        self,
        device: Device,
        *,
        expires_in: int | None = None,
        app_public_key: bytes | None = None,
        device_nonce: bytes | None = None,
    ) -> GrantResult:
        """Sign a grant for a device `grantable` returned."""
        config = self.app.config.wifi
        keys = self._require_keys()
        public_key = device.public_key
        assert public_key is not None, "issue_for takes a device that grantable() returned"
        lifetime = config.default_expires_in_seconds if expires_in is None else expires_in
        if app_public_key is None and not config.allow_server_generated:
            raise BadRequest(
                "server-generated session keys are disabled; send app_public_key",
                code="app_public_key_required",
                field="app_public_key",
            )
        issued = _sign(
            keys,
            gateway_id=self.app.config.daemon.gateway_id,
            device_id=device.id,
            device_public_key=public_key,
            capabilities=device.capabilities,
            expires_in=lifetime,
            now=self.app.clock.now(),
            app_public_key=app_public_key,
            device_nonce=device_nonce,
        )
        result = GrantResult(
            grant_blob=issued.grant_blob,
            jti=issued.jti,
            iat=issued.iat,
            exp=issued.exp,
            expires_at=iso_utc(issued.exp),
            epk=issued.epk,
            device_public_key=public_key,
            session_key=issued.session_key,
            mode=issued.mode,
        )
        self._remember(result.jti, device.id, result.exp)
        self.app.counters[f"wifi.grants.{result.mode}"] += 1
        return result

    async def issue_reply(
        self, **request: Unpack[GrantRequest]
    ) -> tuple[dict[str, Any], GrantResult]:
        """`issue`, also building the `wifi-config/grant` reply body."""
        result = await self.issue(**request)
        return reply_body(result), result

    async def _device(self, device_id: int, org_id: int) -> Device:
        cache = self.app.caches.devices
        device = cache.get(device_id)
        if device is None:
            generation = cache.generation
            device = await self.app.store.call(lambda db: find_device(db, device_id))
            if device is not None:
                cache.put(device, generation)
        if device is None or device.org_id != org_id:
            raise NotFound(
                f"device {device_id} not found", code="device_not_found", field="device_id"
            )
        return device

    def _remember(self, jti: str, device_id: int, exp: int) -> None:
        self._issued[jti] = (device_id, exp)
        while len(self._issued) > MAX_ISSUED_MEMORY:
            self._issued.popitem(last=False)

    def issued_by_us(self, jti: str) -> tuple[int, int] | None:
        """(device_id, exp) of a grant this process issued and still remembers."""
        return self._issued.get(jti)

    # ---- consumed grants

    def exp_for(self, jti: str) -> int:
        """The jti's exp if we issued it, else the latest it could possibly be."""
        known = self.issued_by_us(jti)
        if known is not None:
            return known[1]
        return int(self.app.clock.now()) + MAX_GRANT_LIFETIME

    async def record_consumed(
        self, device_id: int, jti: str, exp: int, *, state: str = "connected"
    ) -> bool:
        """Record `jti` as used until `exp`; True if it was not recorded before."""
        now = self.app.clock.now()

        def insert(db: sqlite_utils.Database) -> bool:
            cur = db.execute(
                "INSERT OR IGNORE INTO consumed_grants (jti, device_id, exp, state, consumed_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [jti, device_id, exp, state, now],
            )
            return cur.rowcount == 1

        return await self.app.store.write(insert)

    async def is_consumed(self, jti: str) -> bool:
        now = self.app.clock.now()

        def find(db: sqlite_utils.Database) -> bool:
            row = db.execute(
                "SELECT 1 FROM consumed_grants WHERE jti = ? AND exp > ?", [jti, now]
            ).fetchone()
            return row is not None

        return await self.app.store.call(find)

    async def prune(self) -> int:
        """Drop consumed records, remembered jtis and retired keys past their time."""
        now = self.app.clock.now()
        for jti in [j for j, (_d, exp) in self._issued.items() if exp <= now]:
            del self._issued[jti]

        def delete(db: sqlite_utils.Database) -> int:
            return db.execute("DELETE FROM consumed_grants WHERE exp <= ?", [now]).rowcount

        removed = await self.app.store.write(delete)
        ring = self.keyring
        kids: list[str] = []
        if isinstance(ring, StoredRing):
            kids = await self.app.store.write(lambda db: keystore.prune(db, now))
        elif ring is not None:
            kids = await asyncio.to_thread(ring.prune, now)
        if kids:
            log.info("wifi.keys_pruned", kids=kids)
        return removed

    async def prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
            with contextlib.suppress(StoreUnavailable):
                await self.prune()


# How other features and plugins find the running grant service.
GRANTS: ServiceKey[GrantService] = ServiceKey("grants")


def require_grantable(device: Device) -> bytes:
    """The device's public key, if grants can be issued for it; else the refusal."""
    if not device.active or device.public_key is None:
        raise Conflict(f"device {device.id} has not activated yet", code="device_not_activated")
    if not device.wifi_capable:
        raise BadRequest(
            f"device {device.id} does not have the WiFi Upload capability (0x02)",
            code="device_not_wifi_capable",
            field="device_id",
        )
    return device.public_key


def reply_body(result: GrantResult) -> dict[str, Any]:
    """The `wifi-config/grant` reply: `session_key` only in server-generated mode."""
    body: dict[str, Any] = {
        "grant_blob": result.grant_blob,
        "expires_at": result.expires_at,
        "device_public_key": b64url_encode(result.device_public_key),
    }
    if result.session_key is not None:
        body["session_key"] = b64url_encode(result.session_key)
    return body


def _sign(keys: _Keys, *, device_id: int, **kwargs: Any) -> IssuedGrant:
    """Run `issue_grant`, turning its refusals into errors.py exceptions."""
    try:
        return issue_grant(
            keys.ring,
            device_id=device_id,
            hs256_master_secret=keys.hs256_master,
            # A stored ring signs with whichever of its keys has come: during an
            # algorithm change that is still the old algorithm's.
            algorithm=None if keys.kek is not None else keys.algorithm,
            **kwargs,
        )
    except InvalidGrantRequest as exc:
        if exc.field == "device_public_key":
            # Stored at activation, so this is the device's record, not the request.
            raise Conflict(
                f"device {device_id} has an unusable public key; re-provision it",
                code="device_key_invalid",
            ) from None
        raise BadRequest(exc.message, code="invalid_field", field=exc.field) from None
    except DeviceNotWifiCapable:  # pragma: no cover - the caller checks first
        raise BadRequest(
            f"device {device_id} does not have the WiFi Upload capability (0x02)",
            code="device_not_wifi_capable",
            field="device_id",
        ) from None
    except AlgorithmUnavailable as exc:
        raise Unavailable(str(exc), code="keys_unavailable") from None


# --------------------------------------------------------------------------- key loading


def keys_directory(config: Config) -> Path:
    """Where generated signing keys live: `wifi.keys_dir`, or beside the database."""
    if config.wifi.keys_dir:
        return resolve_path(config, config.wifi.keys_dir)
    return resolve_path(config, config.store.path).parent / "signing_keys"


def _stored_ring(config: Config) -> bool:
    """Asymmetric keys the daemon manages, on a shared store: the store's ring.

    Operator files (`signing_key_files`) and the HS256 master secret stay
    files: the operator puts the same ones on every host.
    """
    wifi = config.wifi
    return (
        keys_in_store(config) and wifi.signing_algorithm != "HS256" and not wifi.signing_key_files
    )


def _file_ring(config: Config) -> KeyRing | None:
    """This host's file ring, if it has one: what a gateway moving to a cluster brings."""
    try:
        return KeyRing.load_existing(keys_directory(config))
    except KeyRingError as exc:
        raise ConfigError(str(exc), key="wifi.keys_dir") from None
    except OSError as exc:
        raise ConfigError(f"cannot read signing keys: {exc}", key="wifi.keys_dir") from None


def _credential_path(config: Config, name: str) -> Path:
    # Like read_secret's lookup: systemd's $CREDENTIALS_DIRECTORY first for a
    # relative name, then beside the config file.
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and not Path(name).is_absolute():
        candidate = Path(creds) / name
        if candidate.exists():
            return candidate
    return resolve_path(config, name)


def _load_keys(config: Config, now: float) -> _Keys:
    wifi = config.wifi
    alg = wifi.signing_algorithm
    if alg == "HS256":
        if not wifi.hs256_master_secret_file:
            raise ConfigError(
                "required when signing_algorithm is HS256", key="wifi.hs256_master_secret_file"
            )
        master = read_secret(
            config, wifi.hs256_master_secret_file, key="wifi.hs256_master_secret_file"
        )
        if len(master) < MIN_HS256_SECRET:
            raise ConfigError(
                f"the secret must be at least {MIN_HS256_SECRET} bytes",
                key="wifi.hs256_master_secret_file",
            )
        if wifi.signing_key_files:
            log.warning("wifi.signing_key_files_unused", reason="signing_algorithm is HS256")
        return _Keys("HS256", None, master)
    try:
        if wifi.signing_key_files:
            ring = KeyRing.load_files([_credential_path(config, n) for n in wifi.signing_key_files])
            if ring.active.alg != alg:
                raise ConfigError(
                    f"the first key is {ring.active.alg}, but signing_algorithm is {alg}",
                    key="wifi.signing_key_files",
                )
        else:
            ring = KeyRing.load_or_create(keys_directory(config), alg, now=now)
    except KeyRingError as exc:
        key = "wifi.signing_key_files" if wifi.signing_key_files else "wifi.keys_dir"
        raise ConfigError(str(exc), key=key) from None
    except OSError as exc:
        raise ConfigError(f"cannot use signing keys: {exc}", key="wifi.keys_dir") from None
    return _Keys(alg, ring, None)
