"""A tiny name -> (builder, config type) registry, so a new modality, encoder or bridge is one new file plus one
decorator; the config type (a dataclass, or None) is the section of the run config that component reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._configs: dict[str, type | None] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._configs[name] = config
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test's or an unloaded plugin's component), so configs stop carrying its section."""
        self.get(name)
        del self._items[name], self._configs[name]

    def configs(self) -> dict[str, type]:
        """name -> config type of every entry registered with one, in registration order."""
        return {name: config for name, config in self._configs.items() if config is not None}

    def config(self, name: str) -> type | None:
        self.get(name)  # the error that names the registered ones
        return self._configs[name]
