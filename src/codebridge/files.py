"""Atomic file writes: every file the project writes goes through here, so a kill, a full disk or a crash leaves
either the old file or the new one under its name, never a torn one.

A writer gets a temporary path in the same folder (so ``os.replace`` is a rename on one file system), the data is
fsynced, then renamed over the target and the folder entry fsynced. An ``OSError`` is re-raised naming the target
(not the temporary file, and a failed ``write`` names no file at all), so ``codebridge`` can say which file could
not be written; Rust-backed writers (safetensors, tokenizers) raise their own types with "os error N" in the
message, which become the same ``OSError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _named(exc: OSError, path: Path) -> OSError:
    """The same error, naming ``path`` (the file the user knows) instead of a temporary one."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


@contextlib.contextmanager
def naming_errors(path: str | Path) -> Iterator[None]:
    """Turn any file-system error inside (Python's or a Rust writer's "os error N") into an ``OSError`` naming
    ``path``; for writers that cannot go through ``atomic_path`` (a folder written by a library)."""
    try:
        yield
    except OSError as exc:
        raise _named(exc, Path(path)) from exc
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (written by libraries) before the folder is renamed into place."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb+") as f:
            os.fsync(f.fileno())


def _tmp_name(path: Path) -> Path:
    """``dir/.name.tmp<pid>.ext``: hidden, unique per process, keeps the extension for writers that infer the format."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write (safetensors, PIL, matplotlib...); on success it replaces ``path``."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with naming_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit(tmp: Path, path: Path) -> None:
    """Flush the finished file ``tmp`` and rename it to ``path`` (same folder); for writers that stream to a name."""
    with naming_errors(path):
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2, ensure_ascii: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces the folder ``path`` as a whole."""
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    try:
        with naming_errors(path):
            tmp.mkdir(parents=True)
            yield tmp
            _fsync_tree(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def check_writable(path: str | Path) -> None:
    """Fail now (``OSError`` naming ``path``) when ``path`` could not be written, before any work is spent on it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder, expected a file name", str(path))
    probe = _tmp_name(path)
    with naming_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (manifests and index parts record these)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
