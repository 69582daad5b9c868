"""Inputs arrive as a file path or as the encoded file bytes (from a tar shard); one way to open both."""

from __future__ import annotations

import io
from pathlib import Path

Source = str | Path | bytes


def describe(src: Source) -> str:
    """How an error message names the input: the path, or the size of the in-memory file."""
    return f"<{len(src)} bytes>" if isinstance(src, bytes) else str(src)


def as_file(src: Source) -> str | io.BytesIO:
    """A path or file object the decoders accept; a missing file or empty bytes is a ValueError saying so."""
    if isinstance(src, bytes):
        if not src:
            raise ValueError("the file is empty (0 bytes)")
        return io.BytesIO(src)
    if not Path(src).is_file():
        raise ValueError(f"file {src} does not exist")
    return str(src)
