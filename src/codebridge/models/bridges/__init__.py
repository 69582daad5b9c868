"""Bridges: tie modalities together (clip, codebook, fdt); each one file behind ``BRIDGES``."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING

from codebridge.config import ConfigError

if TYPE_CHECKING:
    from codebridge.models.bridges.base import Bridge


@functools.cache
def import_bridges() -> None:
    """Import every module of this package so each built-in bridge registers itself in ``BRIDGES`` (once)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def bridge_names() -> list[str]:
    """Every registered bridge: the built-in ones and any registered since (``@BRIDGES.register``)."""
    from codebridge.models.bridges.base import BRIDGES

    import_bridges()
    return BRIDGES.names()


def bridge_configs() -> dict[str, type]:
    """``model.bridge.<name>``: the config type of every registered bridge that has one."""
    from codebridge.models.bridges.base import BRIDGES

    import_bridges()
    return BRIDGES.configs()


def bridge_class(name: str) -> type[Bridge]:
    """The bridge registered as ``name``; a ConfigError naming ``model.bridge.name`` and the registered ones."""
    from codebridge.models.bridges.base import BRIDGES

    names = bridge_names()
    if name not in names:
        raise ConfigError(
            f"model.bridge.name: {name!r} is not allowed; expected one of {', '.join(map(repr, names))} "
            "(the registered bridges)"
        )
    return BRIDGES.get(name)
