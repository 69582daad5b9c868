"""Where codebridge keeps downloaded and generated data, so every command agrees without configuration."""

from __future__ import annotations

import os
from pathlib import Path


def codebridge_home() -> Path:
    """``$CODEBRIDGE_HOME`` if set, else ``~/.cache/codebridge`` (npm tarball cache, built-in datasets)."""
    env = os.environ.get("CODEBRIDGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "codebridge"


def emoji_root(root: str | Path | None = None) -> Path:
    """The emoji benchmark folder: ``root`` itself, or ``root/emoji`` when ``root`` is a codebridge home holding it.

    ``data.root`` in the config names the codebridge home while ``--out`` names the dataset folder; both work here.
    """
    if root is None:
        return codebridge_home() / "emoji"
    path = Path(root).expanduser()
    if not (path / "manifest.json").is_file() and (path / "emoji" / "manifest.json").is_file():
        return path / "emoji"
    return path
