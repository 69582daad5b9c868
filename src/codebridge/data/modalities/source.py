"""Inputs arrive as a file path or as the encoded file bytes (from a tar shard); one way to open both, and one
way to report that they do not decode."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from codebridge.data.sample import BadSampleError

Source = str | Path | bytes


class DecodeError(BadSampleError):
    """A media file cannot be decoded; raised with what is wrong, ``decoding`` adds which file. A bad sample
    whose source is the file itself (a caller that knows the sample's row names that instead)."""

    def __init__(self, reason: str) -> None:
        super().__init__("", reason)


def describe(src: Source) -> str:
    """How an error message names the input: the path, or the size of the in-memory file."""
    return f"<{len(src)} bytes>" if isinstance(src, bytes) else str(src)


def as_file(src: Source) -> str | io.BytesIO:
    """A path or file object the decoders accept; a missing or empty file is a DecodeError saying so."""
    if isinstance(src, bytes):
        if not src:
            raise DecodeError("the file is empty (0 bytes)")
        return io.BytesIO(src)
    path = Path(src)
    if not path.is_file():
        raise DecodeError("the file does not exist")
    if path.stat().st_size == 0:
        raise DecodeError("the file is empty (0 bytes)")
    return str(src)


@contextmanager
def decoding(kind: str, src: Source) -> Iterator[None]:
    """Turn ANY failure of a decoder (its own errors, OSError, struct/zlib errors, MemoryError...) into a
    DecodeError naming the file. Why: third-party decoders raise dozens of exception types on bad bytes, and a bad
    file must end as a named bad sample, never as a traceback."""
    try:
        yield
    except DecodeError as exc:
        raise DecodeError(f"{kind} {describe(src)}: {exc}") from None
    except Exception as exc:  # any decoder failure is a bad file
        detail = str(exc) or type(exc).__name__
        raise DecodeError(f"cannot decode {kind} {describe(src)}: {detail}") from exc
