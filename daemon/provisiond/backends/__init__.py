"""MQTT backends behind one boundary, chosen by `[mqtt] client` (like uvicorn's
`--http h11|httptools`): a fast default and a well-known compatibility one.

A backend is imported only when chosen, so the native one never loads paho
and the aiomqtt one is optional.
"""

from __future__ import annotations

import importlib

from provisiond.backends.types import Backend
from provisiond.errors import ConfigError

# name -> "module:attribute" of a Backend
BACKENDS = {
    "native": "provisiond.backends.native:NativeBackend",
    "aiomqtt": "provisiond.backends.aiomqtt_backend:AiomqttBackend",
}


class UnknownBackend(ConfigError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown MQTT client {name!r}; choose one of {', '.join(BACKENDS)}")
        self.name = name


class BackendUnavailable(ConfigError):
    """The chosen backend's packages are not installed (a config error: the CLI
    prints it as one line and exits with the config-error status)."""

    def __init__(self, name: str, missing: str) -> None:
        super().__init__(
            f"[mqtt] client = {name!r} needs {missing}, which is not installed "
            f"(pip install 'provisiond[{name}]')"
        )
        self.name = name
        self.missing = missing


def load_backend(name: str) -> Backend:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise UnknownBackend(name) from None
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("provisiond"):
            raise
        raise BackendUnavailable(name, exc.name) from None
    backend: Backend = getattr(module, attribute)()
    return backend
