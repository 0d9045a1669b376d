"""`provisiond broker-accounts init-dynsec`: the broker's first dynamic-security file.

mosquitto's plugin reads its whole state (clients, roles, default access)
from one JSON file at start and rewrites it on every change. The shipped
`config/mosquitto/dynamic-security.json` holds the roles and the accounts of
the daemon and an example service, without passwords; this fills in each
named account's password, as the plugin stores it (PBKDF2-HMAC-SHA512, a
random 12-byte salt, base64), read from a file so it never appears on a
command line. The result is written 0600: mosquitto reads it as root before
dropping privileges, and later rewrites it as its own user.

`mosquitto_ctrl dynsec init FILE admin` is the upstream alternative: it makes
only an `admin` account; the daemon's role would then be added by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

SALT_BYTES = 12
# mosquitto 2.0's own default is 101; the daemon's and services' passwords are
# chosen by people, so they get a stretch that costs ~0.1 s once per connect.
ITERATIONS = 100_000


def hash_password(password: str, *, iterations: int = ITERATIONS) -> dict[str, Any]:
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


class BootstrapError(Exception):
    def __init__(self, message: str, *, username: str | None = None) -> None:
        super().__init__(message)
        self.username = username


def init_dynsec(template: Path, out: Path, passwords: dict[str, str]) -> list[str]:
    """Write `out` from `template` with the given accounts' passwords; returns their names."""
    doc = json.loads(template.read_text(encoding="utf-8"))
    clients = {c.get("username"): c for c in doc.get("clients", [])}
    for username, password in passwords.items():
        client = clients.get(username)
        if client is None:
            raise BootstrapError(f"the template has no account {username!r}", username=username)
        if len(password) < 12:
            raise BootstrapError(
                f"the password of {username!r} is shorter than 12 characters", username=username
            )
        client.update(hash_password(password))
    data = json.dumps(doc, indent="\t").encode() + b"\n"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return sorted(passwords)
