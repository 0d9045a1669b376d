"""Typed services that features provide to each other.

A feature that offers something to others provides it under a `ServiceKey`
(`services.provide(PRESENCE, presence)`); a feature that takes it asks for
the same key and gets a value of the key's type, never an `Any` out of a
string-keyed dict. Which feature provides and which needs what is declared
in `provisiond.runtime.features` and checked before anything is set up.
"""

from __future__ import annotations

from typing import Generic, TypeVar, cast

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class FeatureError(Exception):
    """The features do not fit together: a missing or misordered dependency."""


class ServiceKey(Generic[T_co]):
    """The name and type of one service; compare by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"ServiceKey({self.name!r})"


class Services:
    def __init__(self) -> None:
        self._values: dict[ServiceKey[object], object] = {}

    def provide(self, key: ServiceKey[T], value: T) -> None:
        if key in self._values:
            raise FeatureError(f"service {key.name} is provided twice")
        self._values[cast(ServiceKey[object], key)] = value

    def get(self, key: ServiceKey[T]) -> T:
        """The service; FeatureError if no feature (set up so far) provides it."""
        try:
            return cast(T, self._values[cast(ServiceKey[object], key)])
        except KeyError:
            raise FeatureError(f"no feature provides {key.name}") from None

    def find(self, key: ServiceKey[T]) -> T | None:
        """The service, or None where the feature that provides it is not running."""
        return cast(T | None, self._values.get(cast(ServiceKey[object], key)))

    def __contains__(self, key: ServiceKey[T]) -> bool:
        return key in self._values
