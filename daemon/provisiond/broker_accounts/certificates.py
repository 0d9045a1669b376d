"""Optional X.509 identity: `device/activate` may carry a CSR; the daemon's device CA signs it.

`[broker_accounts] certificates = true`. The certificate's CN is the device's
broker username (`device-N`), whatever the CSR asked for; the key must be
P-256. A mosquitto listener with `require_certificate true`,
`use_identity_as_username true`, `cafile` = the device CA and `crlfile` = the
CRL written here accepts it (config/mosquitto/provisiond.conf, commented).

What mosquitto 2.0.11 does with such a client (checked by
tests/test_broker_accounts.py): the plugin does not authenticate it (the TLS
handshake did), but its ACLs are those of the dynsec account with that
username — so the pending and active roles apply to certificate and password
logins alike, and deleting the account disconnects it. To refuse the
*connection* the serial goes on the CRL, which mosquitto reads again on
SIGHUP (`systemctl reload mosquitto`; systemd/mosquitto-crl-reload.path does
it when the file changes). The daemon cannot signal the broker itself: it
runs as another user.

Revoked at decommission and at re-provision (the old credentials end with the
old token, as the password does). On SQLite the CA key lives in `device_ca/`
beside the database (0600), like the grant signing keys. On PostgreSQL every
daemon must issue from the same CA, so it lives in the store (`device_ca`
table, owned here): the key sealed under the KEK (`keyvault`), made by the
first daemon to start, or imported from that host's `device_ca/` files (a
gateway moving to a cluster keeps the CA its devices' certificates chain
to). Each daemon writes only the certificate and the CRL into its local
`device_ca/` for its broker, never the key (and follows revocations made
through other daemons, `BrokerIdentity.follow_crl`). The CRL is valid for a year
and written again at every start and every revocation: a CRL past its next
update makes OpenSSL refuse every certificate of the CA.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisiond.config import Config, resolve_path
from provisiond.errors import BadRequest, ConfigError
from provisiond.keyvault import KeyEncryptionKey, keys_in_store, load_kek
from provisiond.store import Migration, Store

MIGRATIONS: list[Migration] = [
    Migration(
        "broker-accounts-3-device-ca",
        """
        CREATE TABLE device_ca (
            name TEXT PRIMARY KEY,
            cert_pem TEXT NOT NULL,
            sealed_key BLOB NOT NULL,
            kek_id TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        """,
    ),
]
# The one row of `device_ca` (a name, so a second CA could be added later).
CA_ROW = "device"

CERT_DAYS = 365
CA_DAYS = 3650
CRL_DAYS = 365
MAX_CSR_CHARS = 4096


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def ca_dir(config: Config) -> Path:
    configured = config.broker_accounts.device_ca_dir
    if configured:
        return resolve_path(config, configured)
    return resolve_path(config, config.store.path).parent / "device_ca"


class InvalidCsr(BadRequest):
    code = "invalid_csr"

    def __init__(self, reason: str) -> None:
        super().__init__(f"csr: {reason}", field="csr")
        self.reason = reason


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_atomic(path: Path, data: bytes) -> None:
    # The broker may read it at any moment (a reload): never half a file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


@dataclass
class DeviceCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / "device-ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str) -> DeviceCA:
        """Blocking (files, key generation): call through `asyncio.to_thread`."""
        # Readable by the broker (it loads the CA certificate and the CRL); the
        # key file itself is 0600.
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        existing = _read_files(directory)
        if existing is not None:
            return cls(*existing, directory)
        key, cert = _new_ca(name)
        _write_private(directory / "device-ca.key", _pkcs8(key, serialization.Encoding.PEM))
        ca = cls(key, cert, directory)
        ca.write_cert()
        return ca

    def write_cert(self) -> None:
        """Blocking: the CA certificate where the broker's `cafile` points."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        _write_atomic(self.cert_path, self.cert.public_bytes(serialization.Encoding.PEM))

    def sign(self, csr_pem: str, username: str) -> tuple[str, int]:
        """A client certificate for `username` from the CSR's key; (PEM, serial)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise InvalidCsr("not a PEM certificate signing request") from None
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
            public.curve, ec.SECP256R1
        ):
            raise InvalidCsr("the key must be P-256 (secp256r1)")
        if not csr.is_signature_valid:
            raise InvalidCsr("signature does not verify")
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode(), serial

    def write_crl(self, serials: list[int]) -> None:
        """Blocking: the CRL of every revoked serial, replacing the file atomically."""
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(minutes=1))
            .next_update(now + datetime.timedelta(days=CRL_DAYS))
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - datetime.timedelta(minutes=1))
                .build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        _write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _pkcs8(key: ec.EllipticCurvePrivateKey, encoding: serialization.Encoding) -> bytes:
    return key.private_bytes(
        encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _read_files(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    key_path, cert_path = directory / "device-ca.key", directory / "device-ca.crt"
    if not (key_path.exists() and cert_path.exists()):
        return None
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


# --- the CA in a shared store


class StoredCaCorrupt(ConfigError):
    """The stored CA key is not the key of the stored CA certificate."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the device CA in the store: {reason}")
        self.reason = reason


_CA_LABEL = f"device CA {CA_ROW}"


def stored_ca(
    db: sqlite_utils.Database,
    kek: KeyEncryptionKey,
    candidate: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    *,
    now: float,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """In a write transaction: the store's CA, `candidate` becoming it if there is none.

    Daemons starting together each bring a candidate; the write lock lets the
    first one in, and the others read what it stored.
    """
    db.execute(
        "INSERT OR IGNORE INTO device_ca (name, cert_pem, sealed_key, kek_id, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        [
            CA_ROW,
            candidate[1].public_bytes(serialization.Encoding.PEM).decode(),
            kek.seal(_CA_LABEL, _pkcs8(candidate[0], serialization.Encoding.DER)),
            kek.id,
            now,
        ],
    )
    found = read_stored_ca(db, kek)
    assert found is not None, "inserted above, or by whoever won"
    return found


def reseal_ca(db: sqlite_utils.Database, kek: KeyEncryptionKey) -> int:
    """Seal the store's CA key under `kek` if it is not (opened with `kek.previous`): 1 or 0."""
    row = db.execute("SELECT sealed_key, kek_id FROM device_ca WHERE name = ?", [CA_ROW]).fetchone()
    if row is None or row[1] == kek.id:
        return 0
    der = kek.unseal(_CA_LABEL, row[1], bytes(row[0]))
    db.execute(
        "UPDATE device_ca SET sealed_key = ?, kek_id = ? WHERE name = ?",
        [kek.seal(_CA_LABEL, der), kek.id, CA_ROW],
    )
    return 1


def read_stored_ca(
    db: sqlite_utils.Database, kek: KeyEncryptionKey
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The store's CA, unsealed and checked (None if there is none yet)."""
    row = db.execute(
        "SELECT cert_pem, sealed_key, kek_id FROM device_ca WHERE name = ?", [CA_ROW]
    ).fetchone()
    if row is None:
        return None
    cert_pem, sealed, kek_id = row
    key = serialization.load_der_private_key(kek.unseal(_CA_LABEL, kek_id, bytes(sealed)), None)
    cert = x509.load_pem_x509_certificate(str(cert_pem).encode())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise StoredCaCorrupt("the key does not belong to the certificate")
    return key, cert


async def open_ca(store: Store, config: Config, *, name: str, now: float) -> DeviceCA:
    """The device CA: files on SQLite, the store's (sealed) on PostgreSQL."""
    directory = ca_dir(config)
    if not keys_in_store(config):
        return await asyncio.to_thread(DeviceCA.load_or_create, directory, name=name)
    kek = await asyncio.to_thread(
        load_kek, config, why="broker_accounts.certificates: the device CA lives in the store"
    )

    def bring() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        return _read_files(directory) or _new_ca(name)

    candidate = await asyncio.to_thread(bring)
    key, cert = await store.write(lambda db: stored_ca(db, kek, candidate, now=now))
    ca = DeviceCA(key, cert, directory)
    await asyncio.to_thread(ca.write_cert)
    return ca


# --- store functions (the caller owns the transaction)


def record(db: sqlite_utils.Database, *, device_id: int, serial: int, now: float) -> None:
    db.execute(
        "INSERT INTO device_certificates (serial, device_id, issued_at) VALUES (?, ?, ?)",
        [format(serial, "x"), device_id, now],
    )


def revoke(db: sqlite_utils.Database, device_id: int, *, now: float) -> int:
    """Revoke every certificate of the device; returns how many were live."""
    return int(
        db.execute(
            "UPDATE device_certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
            [now, device_id],
        ).rowcount
    )


def revoked_serials(db: sqlite_utils.Database) -> list[int]:
    return [
        int(row[0], 16)
        for row in db.execute(
            "SELECT serial FROM device_certificates WHERE revoked_at IS NOT NULL"
        ).fetchall()
    ]


def revoked_count(db: sqlite_utils.Database) -> int:
    return int(
        db.execute(
            "SELECT COUNT(*) FROM device_certificates WHERE revoked_at IS NOT NULL"
        ).fetchone()[0]
    )
