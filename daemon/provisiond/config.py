"""Configuration: one TOML file, environment overrides, secrets read from files.

Every key is declared here with its default; `config/provisiond.toml` shows and
explains each. Unknown keys are errors that name the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import os
import tomllib
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from provisiond.errors import ConfigError

DEFAULT_PATH = Path("/etc/provisiond/provisiond.toml")
ENV_PREFIX = "PROVISIOND_"
ENV_CONFIG = "PROVISIOND_CONFIG"
# The operator CLI's API key (`provisiond status`), not a config override.
ENV_KEY = "PROVISIOND_KEY"
EXIT_BAD_CONFIG = 3


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DaemonConfig(Section):
    gateway_id: str = Field(default="gateway", min_length=1, max_length=128)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=600)
    max_concurrent_requests: int = Field(default=256, ge=1, le=100_000)
    max_payload_bytes: int = Field(default=65_536, ge=256, le=16 * 1024 * 1024)
    # any: replies go wherever the request says (correlation data must then be
    # unguessable). per-key: only to <prefix>/replies/<key id>/..., so the
    # broker's ACL can keep each service's replies its own.
    reply_topics: Literal["any", "per-key"] = "any"


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON lines when stdout is not a terminal (journald), readable otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class TlsConfig(Section):
    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure: bool = False


class MqttConfig(Section):
    # The MQTT backend (see provisiond.backends): the daemon's own client, or
    # aiomqtt/paho for compatibility (slower; cannot see broker refusals).
    client: Literal["native", "aiomqtt"] = "native"
    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = Field(default="provisiond", min_length=1, max_length=64)
    client_id: str = Field(default="provisiond", min_length=1, max_length=64)
    username: str = ""
    password_file: str = ""
    keepalive_seconds: int = Field(default=30, ge=5, le=3600)
    session_expiry_seconds: int = Field(default=86_400, ge=0, le=4_294_967_295)
    reconnect_min_seconds: float = Field(default=0.2, gt=0, le=60)
    reconnect_max_seconds: float = Field(default=30.0, gt=0, le=3600)
    receive_maximum: int = Field(default=1000, ge=1, le=65535)
    # Non-empty: one daemon of a group that shares requests and device topics
    # (`$share/<group>/...`) and one store (docs/scaling.md). A share name:
    # MQTT forbids "/", "+" and "#" in it.
    shared_group: str = Field(default="", max_length=64, pattern=r"^[^/+#]*$")
    tls: TlsConfig = TlsConfig()

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_plain(cls, value: str) -> str:
        if any(c in value for c in "+#$") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must not contain + # $ or start/end with /")
        return value


class StoreConfig(Section):
    path: str = "/var/lib/provisiond/provisiond.db"
    # normal: survives a process crash or kill -9 (WAL); full: also power loss.
    synchronous: Literal["normal", "full"] = "normal"
    # Concurrent write requests share one COMMIT (each in its own savepoint);
    # false: one transaction per write, as before (kept to measure against).
    group_commit: bool = True
    # Empty: sqlite:///<path>. Or postgresql://user@host:port/db; the password
    # comes from `password_file` (a secret file, like the others), never the URL.
    url: str = ""
    password_file: str = ""
    # On PostgreSQL: the secret file whose content seals the private keys kept
    # in the store (grant signing keys, device CA); the same on every host.
    key_encryption_key_file: str = ""
    # While the KEK is rotated: the previous KEK's file, to open keys still
    # sealed under it until `provisiond keys reseal` has run (docs/scaling.md).
    previous_key_encryption_key_file: str = ""
    # background: the store's thread gives way to request handling when the
    # CPU is busy (nice +5, SCHED_BATCH), so a flood of one service's writes
    # delays other services' requests less; normal: the daemon's own priority.
    thread_priority: Literal["background", "normal"] = "background"

    @field_validator("url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        if (
            value.startswith(("postgresql://", "postgres://"))
            and ":" in value.split("://", 1)[1].split("@", 1)[0]
            and "@" in value
        ):
            raise ValueError("must not hold a password; use store.password_file")
        if value.startswith(("postgresql://", "postgres://")) and find_spec("psycopg") is None:
            # Said here, as a config error (exit 3, not restarted), rather than
            # as an import traceback when the store opens.
            raise ValueError(
                "a PostgreSQL store needs the psycopg driver: pip install 'provisiond[postgresql]'"
            )
        return value


class TokensConfig(Section):
    lifetime_seconds: int = Field(default=86_400, ge=60, le=365 * 86_400)


class PresenceConfig(Section):
    heartbeat_interval_seconds: float = Field(default=30.0, gt=0, le=86_400)
    timeout_factor: float = Field(default=3.0, ge=1.0, le=100)
    min_interval_seconds: float = Field(default=1.0, gt=0, le=86_400)
    max_interval_seconds: float = Field(default=3600.0, gt=0, le=86_400)


class CommandsConfig(Section):
    ttl_seconds: int = Field(default=86_400, ge=1, le=30 * 86_400)


class WifiConfig(Section):
    signing_algorithm: Literal["EdDSA", "ES256", "HS256"] = "EdDSA"
    # Empty: keys live in `signing_keys/` beside the database.
    keys_dir: str = ""
    # PEM files given explicitly (e.g. via LoadCredential=); the first signs.
    signing_key_files: list[str] = []
    hs256_master_secret_file: str = ""
    allow_server_generated: bool = True
    default_expires_in_seconds: int = Field(default=900, ge=60, le=3600)
    # Keys in a shared store: a rotated key is published at once and signs only
    # this much later, after every daemon has loaded it (docs/scaling.md).
    key_propagation_seconds: float = Field(default=60.0, ge=1, le=86_400)


class LimitsConfig(Section):
    # Requests per second per API key (token bucket); 0 disables.
    rate_per_key: float = Field(default=0.0, ge=0)
    burst_per_key: int = Field(default=100, ge=1)
    # Request slots one API key may hold at once; its further requests wait
    # their turn, served round-robin with other keys' (docs/protocol.md).
    max_inflight_per_key: int = Field(default=16, ge=1, le=100_000)
    # The same bound while another key is active (a request within the last
    # second): a flood's replies then come back in smaller bursts, ahead of
    # fewer of the other key's requests. At most max_inflight_per_key.
    shared_inflight_per_key: int = Field(default=4, ge=1, le=100_000)


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6-address]:port` -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError('must be "host:port", e.g. "127.0.0.1:9108"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in host for c in "[]/ "):
        raise ValueError(f"{host!r} is not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535, not {port_text!r}")
    return host, int(port_text)


class MetricsConfig(Section):
    # Empty: off. "host:port": serve Prometheus metrics at http://host:port/metrics.
    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value


class BrokerAccountsConfig(Section):
    # none: device accounts are managed elsewhere (by hand, another tool).
    # mosquitto-dynsec: the daemon creates, switches and deletes them through
    # mosquitto's dynamic-security plugin (see broker_accounts/).
    backend: Literal["none", "mosquitto-dynsec"] = "none"
    # What provision replies tell devices to connect to; empty host: mqtt.host.
    host: str = Field(default="", max_length=253)
    port: int = Field(default=1883, ge=1, le=65535)
    tls_port: int = Field(default=8883, ge=1, le=65535)
    # Device N's broker username (and its role's name) is <prefix>N. Accounts
    # with this prefix and a numeric rest are the daemon's: sync deletes the
    # ones whose device is gone, so no hand-made account may share it.
    username_prefix: str = Field(default="device-", min_length=1, max_length=32)
    # A dynsec command not answered in this time fails the request with 503.
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Reconcile the broker's accounts with the store at start (in the background).
    sync_at_start: bool = True
    # device/activate may carry a CSR; the daemon's device CA signs it (CN = username).
    certificates: bool = False
    # The device CA's key, certificate and CRL; empty: device_ca/ beside the database.
    device_ca_dir: str = ""

    @field_validator("username_prefix")
    @classmethod
    def _prefix_is_plain(cls, value: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("may hold only letters, digits, - _ .")
        return value


class Config(Section):
    daemon: DaemonConfig = DaemonConfig()
    log: LogConfig = LogConfig()
    mqtt: MqttConfig = MqttConfig()
    store: StoreConfig = StoreConfig()
    tokens: TokensConfig = TokensConfig()
    presence: PresenceConfig = PresenceConfig()
    commands: CommandsConfig = CommandsConfig()
    wifi: WifiConfig = WifiConfig()
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    broker_accounts: BrokerAccountsConfig = BrokerAccountsConfig()
    # Each plugin validates its own table with its own schema.
    plugins: dict[str, dict[str, Any]] = {}

    # Where the file was read from: relative paths in it resolve against it.
    source: str = ""

    @model_validator(mode="after")
    def _dynsec_needs_an_account(self) -> Config:
        # The plugin's commands are refused to anonymous clients: the daemon's
        # own account must be the one holding its admin role.
        if self.broker_accounts.backend == "mosquitto-dynsec" and not self.mqtt.username:
            raise ValueError(
                'broker_accounts.backend = "mosquitto-dynsec" needs mqtt.username'
                " (an account holding the dynamic-security admin role)"
            )
        return self


def config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path | None, env: dict[str, str] | None = None) -> Config:
    """Read and validate a config file plus `PROVISIOND_<SECTION>_<KEY>` overrides.

    A missing file is an error only when it was asked for explicitly; the
    default path may be absent (everything then comes from defaults and env).
    """
    env = dict(os.environ) if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if path != DEFAULT_PATH:
                raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if "source" in raw:
        raise ConfigError("unknown key", key="source")
    _apply_env(raw, env)
    raw["source"] = str(path) if path is not None else ""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or None
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(message, key=key) from None


def _apply_env(raw: dict[str, Any], env: dict[str, str]) -> None:
    sections = {
        name.upper(): name for name in Config.model_fields if name not in ("plugins", "source")
    }
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in (ENV_CONFIG, ENV_KEY):
            continue
        rest = var[len(ENV_PREFIX) :]
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError("environment override names no config section", key=var)
        name = sections[section]
        key = rest[len(section) + 1 :].lower()
        model = Config.model_fields[name].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        if key not in model.model_fields:
            raise ConfigError("environment override names an unknown key", key=var)
        target = raw.setdefault(name, {})
        if not isinstance(target, dict):
            raise ConfigError("must be a table", key=name)
        target[key] = _env_value(value)


def _env_value(value: str) -> Any:
    # Lists and tables come as TOML fragments; scalars stay strings and
    # pydantic coerces them ("1883" -> 1883, "true" -> True).
    if value.startswith("["):
        try:
            return tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            return value
    return value


def resolve_path(config: Config, value: str) -> Path:
    """Resolve a relative path in the config against the config file's folder."""
    path = Path(value)
    if path.is_absolute() or not config.source:
        return path
    return Path(config.source).parent / path


def _secret_candidates(config: Config, name: str) -> list[Path]:
    candidates: list[Path] = []
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and not Path(name).is_absolute():
        candidates.append(Path(creds) / name)
    candidates.append(resolve_path(config, name))
    return candidates


def secret_path(config: Config, name: str) -> Path:
    """Where a secret file is, for libraries that want a path (a TLS key):
    `$CREDENTIALS_DIRECTORY` first, then beside the config file."""
    candidates = _secret_candidates(config, name)
    return next((c for c in candidates if c.exists()), candidates[-1])


def read_secret(config: Config, name: str, *, key: str) -> bytes:
    """Read a secret from a file.

    A relative name is looked up first in `$CREDENTIALS_DIRECTORY` (systemd's
    `LoadCredential=`), then beside the config file. Errors name the config key,
    never the secret's content.
    """
    for candidate in _secret_candidates(config, name):
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"cannot read secret file {candidate}: {exc.strerror}", key=key
            ) from None
        return data.rstrip(b"\r\n")
    raise ConfigError(f"secret file not found: {name}", key=key)
