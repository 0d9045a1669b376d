"""Config: the example file, env overrides, unknown keys, secrets from files."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from provisiond.config import Config, load, read_secret, secret_path
from provisiond.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "provisiond.toml"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        if name in ("source", "plugins"):
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _keys(ann, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _file_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in data.items():
        if isinstance(value, dict):
            keys |= _file_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_example_config_shows_every_key_with_its_default() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert _file_keys(data) == _keys(Config)
    loaded = load(EXAMPLE, env={})
    defaults = Config()
    assert loaded.model_dump(exclude={"source"}) == defaults.model_dump(exclude={"source"})


def _refused(tmp_path: Path, text: str) -> ConfigError:
    """The error loading a config file of `text` (and no environment) raises."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    return err.value


def test_unknown_key_is_named(tmp_path: Path) -> None:
    assert _refused(tmp_path, "[store]\npaht = 'x'\n").key == "store.paht"


def test_bad_value_is_named(tmp_path: Path) -> None:
    assert _refused(tmp_path, "[mqtt]\nport = 70000\n").key == "mqtt.port"


def test_env_overrides_and_unknown_env_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[mqtt]\nport = 1884\n")
    config = load(path, env={"PROVISIOND_MQTT_PORT": "1999", "PROVISIOND_MQTT_TOPIC_PREFIX": "gw7"})
    assert config.mqtt.port == 1999 and config.mqtt.topic_prefix == "gw7"
    with pytest.raises(ConfigError) as err:
        load(path, env={"PROVISIOND_MQTT_HOTS": "x"})
    assert err.value.key == "PROVISIOND_MQTT_HOTS"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path / "nope.toml", env={})


def test_secret_from_credentials_directory_then_beside_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    (tmp_path / "mqtt-password").write_text("beside\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    config = load(path, env={})
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_secret(config, "mqtt-password", key="mqtt.password_file") == b"beside"
    (creds / "mqtt-password").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret(config, "mqtt-password", key="mqtt.password_file") == b"from-systemd"
    assert secret_path(config, "mqtt-password") == creds / "mqtt-password"
    assert secret_path(config, "tls.key") == tmp_path / "tls.key"
    with pytest.raises(ConfigError) as err:
        read_secret(config, "absent", key="mqtt.password_file")
    assert err.value.key == "mqtt.password_file"
    assert "from-systemd" not in str(err.value)


def test_dynsec_backend_needs_the_daemons_broker_account(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[broker_accounts]\nbackend = "mosquitto-dynsec"\n')
    with pytest.raises(ConfigError, match=r"needs mqtt\.username"):
        load(path, env={})
    path.write_text(
        '[mqtt]\nusername = "provisiond"\n[broker_accounts]\nbackend = "mosquitto-dynsec"\n'
    )
    assert load(path, env={}).broker_accounts.backend == "mosquitto-dynsec"
    path.write_text('[broker_accounts]\nusername_prefix = "dev/"\n')
    with pytest.raises(ConfigError, match=r"broker_accounts\.username_prefix"):
        load(path, env={})


def test_store_url_is_checked_and_never_holds_a_password(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[store]\nurl = "postgresql://provisiond@db:5432/provisiond"\n')
    assert load(path, env={}).store.url.startswith("postgresql://")
    for bad in ("mysql://x@y/z", "postgresql://provisiond:hunter2@db:5432/provisiond"):
        path.write_text(f'[store]\nurl = "{bad}"\n')
        with pytest.raises(ConfigError) as err:
            load(path, env={})
        assert err.value.key == "store.url"
        assert "hunter2" not in str(err.value)
