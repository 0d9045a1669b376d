"""The key-encryption key (KEK) that seals private keys kept in a shared store.

On PostgreSQL every daemon of a fleet must sign grants with the same keys and
issue certificates from the same device CA, and the hosts share no file
system: those private keys live in the store (`wifi/keystore.py`,
`broker_accounts/certificates.py`), sealed here. The database, its dumps and
its backups therefore never hold a private key in clear; whoever reads them
also needs the KEK, which lives only in a credential file on each daemon's
host (`[store] key_encryption_key_file`, e.g. systemd `LoadCredential=`), the
same content on every host.

Sealing is AES-256-GCM under a key derived (HKDF-SHA256) from the file's
content, with a fresh 96-bit nonce per seal and the row's label (what the key
is, and its name) as associated data, so a sealed key cannot be moved to
another row unnoticed. Each row also records the KEK's id (a hash, never the
key), so a host given a different file is told so plainly instead of failing
on a bad tag.

Rotation (docs/scaling.md, "Rotating the key-encryption key"): a host may
also hold the previous KEK (`[store] previous_key_encryption_key_file`); it
then opens rows sealed under either, and always seals under the current one.
`provisiond keys reseal` re-seals every row under the current KEK, after
which the previous file can go.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from provisiond.config import Config, read_secret
from provisiond.errors import ConfigError

KEK_KEY: Final = "store.key_encryption_key_file"
PREVIOUS_KEK_KEY: Final = "store.previous_key_encryption_key_file"
MIN_KEK_BYTES: Final = 32
_NONCE_BYTES: Final = 12
_INFO_AEAD: Final = b"provisiond key-encryption v1 aes-256-gcm"
_INFO_ID: Final = b"provisiond key-encryption v1 id"


class KeyEncryptionKeyMissing(ConfigError):
    """The store holds private keys, so the config must name the KEK file."""

    def __init__(self, why: str) -> None:
        super().__init__(
            f"required on PostgreSQL ({why}); put the same secret file on every host",
            key=KEK_KEY,
        )
        self.why = why


class WrongKeyEncryptionKey(ConfigError):
    """A sealed key was sealed under another KEK (or was altered): nothing can use it."""

    def __init__(self, label: str, stored_id: str, file_id: str) -> None:
        if stored_id == file_id:
            message = f"{label} in the store does not decrypt: the row was altered"
        else:
            message = (
                f"{label} in the store was sealed with key-encryption key {stored_id}, "
                f"but this file is {file_id}: every daemon needs the same file"
            )
        super().__init__(message, key=KEK_KEY)
        self.label = label
        self.stored_id = stored_id
        self.file_id = file_id


def keys_in_store(config: Config) -> bool:
    """Private keys live in the store exactly when the store is shared (PostgreSQL)."""
    return config.store.url.startswith(("postgresql://", "postgres://"))


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class KeyEncryptionKey:
    """The AEAD key derived from the KEK file, and its public id.

    `previous`: the KEK being rotated away from, if the host holds it; only
    ever used to open rows sealed under it.
    """

    id: str
    aead_key: bytes = field(repr=False)
    previous: KeyEncryptionKey | None = field(default=None, repr=False)

    @classmethod
    def from_secret(cls, secret: bytes, *, key: str = KEK_KEY) -> KeyEncryptionKey:
        """`key`: the config key named if the secret is too short."""
        if len(secret) < MIN_KEK_BYTES:
            raise ConfigError(f"the secret must be at least {MIN_KEK_BYTES} bytes", key=key)
        # The id is a hash of a derived value, not of the file: it names the
        # KEK in errors and rows without helping anyone guess it.
        kek_id = hashlib.sha256(_derive(secret, _INFO_ID)).hexdigest()[:16]
        return cls(kek_id, _derive(secret, _INFO_AEAD))

    def seal(self, label: str, plaintext: bytes) -> bytes:
        """nonce || AES-256-GCM(plaintext), bound to `label`."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + AESGCM(self.aead_key).encrypt(nonce, plaintext, label.encode())

    def unseal(self, label: str, kek_id: str, sealed: bytes) -> bytes:
        """The plaintext of a `seal`; `WrongKeyEncryptionKey` if this KEK cannot open it."""
        if kek_id != self.id and self.previous is not None and kek_id == self.previous.id:
            return self.previous.unseal(label, kek_id, sealed)
        try:
            return AESGCM(self.aead_key).decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], label.encode()
            )
        except (InvalidTag, ValueError):
            raise WrongKeyEncryptionKey(label, kek_id, self.id) from None


def load_kek(config: Config, *, why: str) -> KeyEncryptionKey:
    """The configured KEK; a config error naming `store.key_encryption_key_file` otherwise.

    `why` says what needs it, for the error when none is configured.
    """
    name = config.store.key_encryption_key_file
    if not name:
        raise KeyEncryptionKeyMissing(why)
    current = KeyEncryptionKey.from_secret(read_secret(config, name, key=KEK_KEY))
    previous_name = config.store.previous_key_encryption_key_file
    if not previous_name:
        return current
    secret = read_secret(config, previous_name, key=PREVIOUS_KEK_KEY)
    previous = KeyEncryptionKey.from_secret(secret, key=PREVIOUS_KEK_KEY)
    return current if previous.id == current.id else replace(current, previous=previous)
