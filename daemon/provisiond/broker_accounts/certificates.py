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
old token, as the password does). The CA key lives in `device_ca/` beside the
database (0600), like the grant signing keys. The CRL is valid for a year
and written again at every start and every revocation: a CRL past its next
update makes OpenSSL refuse every certificate of the CA.
"""

from __future__ import annotations

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
from provisiond.errors import BadRequest

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
        key_path, cert_path = directory / "device-ca.key", directory / "device-ca.crt"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return cls(key, cert, directory)
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
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, directory)

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
