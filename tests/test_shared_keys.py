"""Keys shared by every daemon on one PostgreSQL store (docs/scaling.md, "Keys across daemons").

Each daemon here plays a host of its own: its own state directory (so no
key file is shared), its own topic prefix (so a request reaches the daemon
the test means), one PostgreSQL database and one KEK file between them.
These tests run on a real throwaway cluster whatever `--store` says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pg_cluster
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from daemon_proc import write_toml
from provision_support import activate, provision
from structlog.testing import LogCapture
from test_broker_accounts import _csr
from test_wifi_grants import Dev

from provisiond.broker_accounts.certificates import read_stored_ca
from provisiond.broker_accounts.feature import CRL_POLL_SECONDS
from provisiond.config import Config
from provisiond.keyvault import KeyEncryptionKey
from provisiond.store import open_database, transaction
from provisiond.wifi import keystore
from provisiond.wifi.crypto import GRANT_AUDIENCE, b64url_decode
from support import (
    Broker,
    RpcClient,
    eventually,
    kek_file,
    make_config,
    remember_secret,
    rows,
    running,
    seed_key,
)

# Starts daemons / opens stores: the PostgreSQL pass runs it too (tests/conftest.py).
pytestmark = pytest.mark.store

ROOT = Path(__file__).resolve().parents[1]
PROPAGATION = 2.0


@pytest.fixture(scope="module")
def cluster() -> pg_cluster.PgCluster:
    return pg_cluster.shared()


def host_config(
    tmp_path: Path, broker: Broker, url: str, host: str, **sections: dict[str, Any]
) -> Config:
    """One daemon of the fleet: the shared store, a state directory of its own."""
    state = tmp_path / host
    state.mkdir(exist_ok=True)
    wifi = {"key_propagation_seconds": PROPAGATION, **sections.pop("wifi", {})}
    return make_config(
        tmp_path,
        broker,
        store={
            "url": url,
            "path": str(state / "provisiond.db"),
            "key_encryption_key_file": str(kek_file()),
        },
        wifi=wifi,
        **sections,
    )


def the_kek() -> KeyEncryptionKey:
    return KeyEncryptionKey.from_secret(kek_file().read_bytes().rstrip(b"\r\n"))


def kid_of(blob: str) -> str:
    return str(json.loads(b64url_decode(blob.split(".", maxsplit=1)[0]))["kid"])


def verify(blob: str, jwks: list[dict[str, Any]]) -> dict[str, Any]:
    """The grant's claims if one of `jwks` verifies it (PyJWT, not the daemon's code)."""
    kid = kid_of(blob)
    (jwk,) = [j for j in jwks if j["kid"] == kid]
    key = jwt.PyJWK(jwk)
    claims: dict[str, Any] = jwt.decode(
        blob,
        key.key,
        algorithms=[jwk["alg"]],
        audience=GRANT_AUDIENCE,
        options={"verify_iat": False},
    )
    return claims


async def published(rpc: RpcClient, key: str) -> list[dict[str, Any]]:
    reply = await rpc.call("wifi-config/keys", key=key)
    assert reply["status"] == 200, reply
    keys: list[dict[str, Any]] = reply["body"]["keys"]
    return keys


def cli(config_file: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"}
    return subprocess.run(
        [sys.executable, "-m", "provisiond", *argv, "-c", str(config_file)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


@pytest.fixture
async def fleet(
    tmp_path: Path, broker: Broker, cluster: pg_cluster.PgCluster, logs: LogCapture
) -> AsyncIterator[tuple[Config, Config, RpcClient, RpcClient, str, Dev]]:
    """Daemons A and B on one database; an API key and an activated device in it."""
    url = cluster.new_database()
    a = host_config(tmp_path, broker, url, "host-a")
    b = host_config(tmp_path, broker, url, "host-b")
    _, key = seed_key(a)
    dev = Dev(a)
    async with running(a), running(b), RpcClient(a) as ra, RpcClient(b) as rb:
        yield a, b, ra, rb, key, dev


# A valid X25519 public key for e2e grants (the daemon never learns its private half).
def _app_key() -> str:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    raw = X25519PrivateKey.generate().public_key().public_bytes_raw()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_two_daemons_sign_grants_that_verify_with_the_keys_either_publishes(
    fleet: tuple[Config, Config, RpcClient, RpcClient, str, Dev],
) -> None:
    a, b, ra, rb, key, dev = fleet
    keys_a, keys_b = await published(ra, key), await published(rb, key)
    assert keys_a == keys_b and len(keys_a) == 1
    for rpc in (ra, rb):
        blob = await grant_e2e(rpc, key, dev.id)
        for jwks in (keys_a, keys_b):
            assert verify(blob, jwks)["sub"] == str(dev.id)
    # No host keeps a key file: the ring is the store's, sealed.
    for config in (a, b):
        assert not (Path(config.store.path).parent / "signing_keys").exists()
    assert rows(a, "SELECT COUNT(*) FROM signing_keys") == [(1,)]


async def grant_e2e(rpc: RpcClient, key: str, device_id: int) -> str:
    reply = await rpc.call(
        "wifi-config/grant", {"device_id": device_id, "app_public_key": _app_key()}, key=key
    )
    assert reply["status"] == 200, reply
    return str(reply["body"]["grant_blob"])


async def watch_rotation(
    ra: RpcClient, rb: RpcClient, key: str, device_id: int, old: str, rotate: Any
) -> tuple[list[str], dict[str, set[str]]]:
    """Grants from A and B in turn while `rotate()` runs; each grant's kid checked
    against what the *other* daemon publishes right after it was signed.

    Returns the violations, and which kids each daemon signed with.
    """
    violations: list[str] = []
    signed: dict[str, set[str]] = {"A": set(), "B": set()}
    rotation = asyncio.ensure_future(rotate())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for name, signer, other in (("A", ra, rb), ("B", rb, ra)):
            blob = await grant_e2e(signer, key, device_id)
            kid = kid_of(blob)
            signed[name].add(kid)
            jwks = await published(other, key)
            if kid not in {j["kid"] for j in jwks}:
                violations.append(f"{name} signed with {kid}, the other publishes {jwks}")
            else:
                verify(blob, jwks)
        if rotation.done() and all(s - {old} for s in signed.values()):
            break
    await rotation
    return violations, signed


async def test_rotation_while_both_run_never_signs_with_a_key_the_other_does_not_publish(
    tmp_path: Path, fleet: tuple[Config, Config, RpcClient, RpcClient, str, Dev]
) -> None:
    a, _b, ra, rb, key, dev = fleet
    (before,) = await published(ra, key)
    config_file = write_toml(a, tmp_path / "operator.toml")

    async def rotate() -> None:
        await asyncio.sleep(0.5)
        done = await asyncio.to_thread(cli, config_file, "keys", "rotate-signing")
        assert done.returncode == 0, done.stderr
        assert "no reload needed" in done.stdout

    violations, signed = await watch_rotation(ra, rb, key, dev.id, before["kid"], rotate)
    assert not violations, violations[:3]
    # Both daemons went over to the new key, by themselves (no SIGHUP).
    new = (signed["A"] | signed["B"]) - {before["kid"]}
    assert len(new) == 1 and all(new <= s for s in signed.values()), signed
    # The old key stays published for the grants it signed last.
    for rpc in (ra, rb):
        assert [j["kid"] for j in await published(rpc, key)] == [*new, before["kid"]]


async def test_the_check_catches_a_key_that_signs_before_every_daemon_has_it(
    tmp_path: Path, broker: Broker, cluster: pg_cluster.PgCluster, logs: LogCapture
) -> None:
    """The rotation test can fail: a key made to sign at once (no propagation
    delay), with B re-reading the store only every 5 s, is caught signing by A
    while B does not publish it yet."""
    url = cluster.new_database()
    a = host_config(tmp_path, broker, url, "host-a")
    b = host_config(tmp_path, broker, url, "host-b", wifi={"key_propagation_seconds": 60.0})
    _, key = seed_key(a)
    dev = Dev(a)
    async with running(a), running(b), RpcClient(a) as ra, RpcClient(b) as rb:
        (before,) = await published(ra, key)

        async def rotate_without_delay() -> None:
            await asyncio.sleep(0.5)
            db = open_database(url)
            try:
                with transaction(db):
                    keystore.rotate(db, the_kek(), now=time.time(), propagation=0.0)
            finally:
                db.conn.close()

        violations, _signed = await watch_rotation(
            ra, rb, key, dev.id, before["kid"], rotate_without_delay
        )
    assert violations, "a key that signs at once went unnoticed"


async def test_the_device_ca_and_its_crl_are_the_same_on_both_daemons(
    tmp_path: Path, broker: Broker, cluster: pg_cluster.PgCluster, logs: LogCapture
) -> None:
    url = cluster.new_database()
    certificates = {"broker_accounts": {"certificates": True}}
    a = host_config(tmp_path, broker, url, "host-a", **certificates)
    b = host_config(tmp_path, broker, url, "host-b", **certificates)
    key = seed_key(a, users=(10,))[1]
    async with running(a), running(b), RpcClient(a) as ra, RpcClient(b) as rb:
        token, device_id = await provision(ra, key)
        _private, csr = _csr()
        reply = await activate(ra, token, csr=csr)
        assert reply["status"] == 200, reply
        issued = x509.load_pem_x509_certificate(reply["body"]["certificate"].encode())
        token_b, _ = await provision(rb, key)
        reply_b = await activate(rb, token_b, csr=_csr()[1])
        assert reply_b["status"] == 200, reply_b
        # Revoked through A, on B's CRL too (B's broker reads it on reload).
        gone = await ra.call("device/decommission", {"deviceId": device_id}, key=key)
        assert gone["status"] == 200, gone
        crl_b = Path(b.store.path).parent / "device_ca" / "crl.pem"

        def revoked_on_b() -> bool:
            crl = x509.load_pem_x509_crl(crl_b.read_bytes())
            return crl.get_revoked_certificate_by_serial_number(issued.serial_number) is not None

        await eventually(revoked_on_b, timeout=CRL_POLL_SECONDS + 3)
    assert reply["body"]["ca_certificate"] == reply_b["body"]["ca_certificate"]
    # What B's broker loads as its cafile verifies what A issued.
    ca_b = x509.load_pem_x509_certificate(
        (Path(b.store.path).parent / "device_ca" / "device-ca.crt").read_bytes()
    )
    issued.verify_directly_issued_by(ca_b)
    assert issued.subject.rfc4514_string() == f"CN=device-{device_id}"
    # Neither host holds the CA key in a file.
    for config in (a, b):
        assert not (Path(config.store.path).parent / "device_ca" / "device-ca.key").exists()


def pg_dump(cluster: pg_cluster.PgCluster, url: str) -> bytes:
    database = url.rsplit("/", 1)[1]
    return subprocess.run(
        [pg_cluster._bin("pg_dump"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
         "--inserts", database],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip


def spellings(secret: bytes) -> list[bytes]:
    """How a private key could show up in a dump or a log line."""
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


async def test_private_keys_are_never_in_the_database_or_the_logs_in_clear(
    tmp_path: Path, broker: Broker, cluster: pg_cluster.PgCluster, logs: LogCapture
) -> None:
    url = cluster.new_database()
    a = host_config(tmp_path, broker, url, "host-a", broker_accounts={"certificates": True})
    _, key = seed_key(a)
    async with running(a), RpcClient(a) as ra:
        await published(ra, key)
    config_file = write_toml(a, tmp_path / "operator.toml")
    assert cli(config_file, "keys", "rotate-signing").returncode == 0
    db = open_database(url)
    try:
        stored = keystore.load(db, the_kek())
        ca = read_stored_ca(db, the_kek())
    finally:
        db.conn.close()
    assert ca is not None
    ca_key = ca[0]
    assert len(stored) == 2
    secrets: list[bytes] = []
    for k in (*(s.key.private_key for s in stored), ca_key):
        der = k.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pem = k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Whole PEM, and each line of it that holds key bytes (an EC key's
        # first line starts with a header every P-256 key shares).
        lines = pem.splitlines()[1:-1]
        secrets += [*spellings(der), pem, b"".join(lines), *lines]
        if isinstance(k, ec.EllipticCurvePrivateKey):
            secrets += spellings(k.private_numbers().private_value.to_bytes(32, "big"))
        else:
            secrets += spellings(
                k.private_bytes(
                    serialization.Encoding.Raw,
                    serialization.PrivateFormat.Raw,
                    serialization.NoEncryption(),
                )
            )
    # The whole session's logs and events are searched for these too (leakcheck.py).
    for secret in secrets:
        if secret.isascii():
            remember_secret(secret.decode())
    dump = pg_dump(cluster, url)
    # The dump holds the rows (so the scan below looks at the sealed keys)...
    assert dump.count(b"INSERT INTO public.signing_keys ") == 2
    assert dump.count(b"INSERT INTO public.device_ca ") == 1
    text = "\n".join(repr(e) for e in logs.entries).encode()
    for secret in secrets:
        assert secret not in dump, "a private key is in the database in clear"
        assert secret not in text, "a private key is in the log"


def run_briefly(config_file: Path) -> subprocess.CompletedProcess[str]:
    """`provisiond run`, stopped after a few seconds if it did start."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisiond", "run", "-c", str(config_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


async def test_a_missing_or_wrong_kek_file_is_a_config_error_exit_3(
    tmp_path: Path, broker: Broker, cluster: pg_cluster.PgCluster, logs: LogCapture
) -> None:
    url = cluster.new_database()
    good = host_config(tmp_path, broker, url, "host-a")
    async with running(good):
        pass  # the store now holds a key sealed under the fleet's KEK
    kek_key = "store.key_encryption_key_file"

    unset = write_toml(good, tmp_path / "unset.toml", store={kek_key.split(".")[1]: ""})
    missing = write_toml(
        good, tmp_path / "missing.toml", store={"key_encryption_key_file": str(tmp_path / "nope")}
    )
    other = tmp_path / "other-kek"
    other.write_text(remember_secret(base64.b64encode(os.urandom(32)).decode()))
    wrong = write_toml(good, tmp_path / "wrong.toml", store={"key_encryption_key_file": str(other)})
    short = tmp_path / "short-kek"
    short.write_text("too short")
    too_short = write_toml(
        good, tmp_path / "short.toml", store={"key_encryption_key_file": str(short)}
    )
    expected = {
        unset: "required on PostgreSQL",
        missing: "secret file not found",
        wrong: "but this file is",
        too_short: "at least 32 bytes",
    }
    for config_file, why in expected.items():
        for result in (
            await asyncio.to_thread(run_briefly, config_file),
            await asyncio.to_thread(cli, config_file, "keys", "rotate-signing"),
        ):
            assert result.returncode == 3, (config_file.name, result.args, result.stderr)
            assert kek_key in result.stderr and why in result.stderr, result.stderr
            assert other.read_text() not in result.stderr
    # Nothing was rotated by the refused commands.
    assert rows(good, "SELECT COUNT(*) FROM signing_keys") == [(1,)]


async def test_a_gateway_moving_to_the_cluster_keeps_its_signing_key_and_device_ca(
    tmp_path: Path, broker: Broker, cluster: pg_cluster.PgCluster, logs: LogCapture
) -> None:
    """The gateway's file keys become the fleet's: its devices pinned that key,
    and their certificates chain to that CA."""
    certificates = {"certificates": True}
    gateway = make_config(
        tmp_path, broker, store={"url": "", "path": str(tmp_path / "gw" / "provisiond.db")},
        broker_accounts=certificates,
    )  # fmt: skip
    _, key = seed_key(gateway)
    async with running(gateway), RpcClient(gateway) as rpc:
        (pinned,) = await published(rpc, key)
    ca_file = tmp_path / "gw" / "device_ca" / "device-ca.crt"
    ca_pem = ca_file.read_bytes()

    url = cluster.new_database()
    copied = subprocess.run(
        [sys.executable, "-m", "provisiond", "db", "copy",
         f"sqlite:///{gateway.store.path}", url],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"},
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    # The first daemon of the cluster runs on the old gateway (same state directory).
    moved = gateway.model_copy(
        update={
            "store": gateway.store.model_copy(
                update={"url": url, "key_encryption_key_file": str(kek_file())}
            )
        }
    )
    other = host_config(tmp_path, broker, url, "host-b", broker_accounts=certificates)
    async with running(moved), running(other), RpcClient(other) as rb:
        assert await published(rb, key) == [pinned]
    assert (Path(other.store.path).parent / "device_ca" / "device-ca.crt").read_bytes() == ca_pem


async def test_a_daemon_cut_off_from_the_store_stops_publishing_and_signing_then_recovers(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    """Unrefreshed for half the propagation delay, a daemon might miss a key the
    others are about to sign with: it answers 503 `keys_stale` instead."""
    private = pg_cluster.PgCluster().start()
    try:
        url = private.new_database()
        config = host_config(tmp_path, broker, url, "host-a")
        _, key = seed_key(config)
        dev = Dev(config)
        async with running(config), RpcClient(config) as rpc:
            await grant_e2e(rpc, key, dev.id)  # the device is cached from here on
            private.halt()
            await asyncio.sleep(keystore.stale_after(PROPAGATION) + 0.5)
            for op, body in (
                ("wifi-config/keys", {}),
                ("wifi-config/grant", {"device_id": dev.id, "app_public_key": _app_key()}),
            ):
                reply = await rpc.call(op, body, key=key)
                assert reply["status"] == 503, reply
                assert reply["error"]["code"] == "keys_stale", reply
            private.resume()
            deadline = time.monotonic() + 15
            while (reply := await rpc.call("wifi-config/keys", key=key))["status"] != 200:
                assert time.monotonic() < deadline, reply
                await asyncio.sleep(0.2)
            await grant_e2e(rpc, key, dev.id)
    finally:
        private.stop()


def with_keks(config: Config, current: Path, previous: Path | None) -> Config:
    store = {
        "key_encryption_key_file": str(current),
        "previous_key_encryption_key_file": "" if previous is None else str(previous),
    }
    return config.model_copy(update={"store": config.store.model_copy(update=store)})


def sealed_under(config: Config) -> set[str]:
    """The KEK ids the store's sealed keys (signing keys, device CA) record."""
    found = rows(config, "SELECT kek_id FROM signing_keys") + rows(
        config, "SELECT kek_id FROM device_ca"
    )
    return {str(r[0]) for r in found}


async def test_the_kek_is_rotated_in_three_steps_while_the_keys_stay_the_same(
    tmp_path: Path, broker: Broker, cluster: pg_cluster.PgCluster, logs: LogCapture
) -> None:
    """docs/scaling.md, "Rotating the key-encryption key": new KEK beside the old
    on every host, `provisiond keys reseal` once, then the old KEK removed. The
    keys themselves never change: the same kid signs, the same CA issues."""
    url = cluster.new_database()
    certificates = {"broker_accounts": {"certificates": True}}
    a = host_config(tmp_path, broker, url, "host-a", **certificates)
    b = host_config(tmp_path, broker, url, "host-b", **certificates)
    _, key = seed_key(a, users=(10,))
    dev = Dev(a)
    old, new = kek_file(), tmp_path / "new-kek"
    new.write_text(remember_secret(base64.b64encode(os.urandom(32)).decode()) + "\n")
    new_id = KeyEncryptionKey.from_secret(new.read_bytes().rstrip(b"\n")).id
    async with running(a), RpcClient(a) as ra:
        (before,) = await published(ra, key)
        ca_before = (await activate(ra, (await provision(ra, key))[0], csr=_csr()[1]))["body"][
            "ca_certificate"
        ]
    assert sealed_under(a) == {the_kek().id}

    # 1. Both KEKs on every host.
    a1, b1 = with_keks(a, new, old), with_keks(b, new, old)
    both = write_toml(b1, tmp_path / "both.toml")
    async with running(a1), running(b1), RpcClient(a1) as ra, RpcClient(b1) as rb:
        for rpc in (ra, rb):
            assert await published(rpc, key) == [before]
        # 2. Once, on any host, while the daemons run.
        done = await asyncio.to_thread(cli, both, "keys", "reseal")
        assert done.returncode == 0, done.stderr
        assert "resealed 1 signing key(s) and the device CA key" in done.stdout, done.stdout
        assert new_id in done.stdout and "previous_key_encryption_key_file" in done.stdout
        assert sealed_under(a) == {new_id}
        again = await asyncio.to_thread(cli, both, "keys", "reseal")
        assert again.returncode == 0 and "resealed 0 signing key(s) under" in again.stdout
        # The running daemons keep signing with the key they hold.
        blob = await grant_e2e(rb, key, dev.id)
        assert kid_of(blob) == before["kid"]
        verify(blob, await published(ra, key))

    # 3. The old KEK gone: the same key and CA, opened with the new KEK alone.
    a3 = with_keks(a, new, None)
    async with running(a3), RpcClient(a3) as ra:
        assert await published(ra, key) == [before]
        verify(await grant_e2e(ra, key, dev.id), [before])
        reply = await activate(ra, (await provision(ra, key))[0], csr=_csr()[1])
        assert reply["body"]["ca_certificate"] == ca_before
    # A host left with only the old KEK is told so, and starts nothing.
    stale = write_toml(with_keks(a, old, None), tmp_path / "stale.toml")
    refused = await asyncio.to_thread(run_briefly, stale)
    assert refused.returncode == 3, refused.stderr
    assert f"was sealed with key-encryption key {new_id}" in refused.stderr
    # Nor does `keys reseal` with that file write anything.
    refused = await asyncio.to_thread(cli, stale, "keys", "reseal")
    assert refused.returncode == 3 and "store.key_encryption_key_file" in refused.stderr
    assert sealed_under(a) == {new_id}
    for result in (done, again, refused):
        assert new.read_text().strip() not in result.stdout + result.stderr
        assert old.read_text().strip() not in result.stdout + result.stderr


async def test_keys_reseal_on_sqlite_says_there_is_nothing_sealed(
    tmp_path: Path, broker: Broker
) -> None:
    gateway = make_config(
        tmp_path, broker, store={"url": "", "path": str(tmp_path / "provisiond.db")}
    )
    result = await asyncio.to_thread(
        cli, write_toml(gateway, tmp_path / "p.toml"), "keys", "reseal"
    )
    assert result.returncode == 1
    assert "the store is SQLite: its keys are files in the state directory" in result.stderr
