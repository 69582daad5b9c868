"""One writer per output folder: an exclusive ``flock`` on ``DIR/.lock``, held for the whole job.

The kernel drops a ``flock`` when its holder exits, however it exits (SIGKILL included), so a killed run never
leaves a folder locked; the file itself stays (deleting it would let two processes lock two different files).
It holds the pid, host and start time of the holder, for the message the next one gets. The lock is re-entrant
within a process (``codebridge demo`` holds its run folder and calls the trainer, which takes it again).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from codebridge.config import ConfigError

LOCK_FILE = ".lock"

_held: dict[Path, int] = {}  # folders this process holds -> nesting depth


class FolderInUse(ConfigError):
    """Another process holds the folder; one line naming it, the holder and what to do."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").split()
    fields = dict(item.split("=", 1) for item in text if "=" in item)
    return f"pid {fields.get('pid', '?')} on host {fields.get('host', '?')} since {fields.get('since', '?')}"


@contextlib.contextmanager
def folder_lock(
    folder: str | Path, what: str = "output_dir", hint: str = "choose another output_dir"
) -> Iterator[None]:
    """Hold ``folder`` (created if missing) exclusively, or raise ``FolderInUse`` at once (no waiting)."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(f"{what} {folder} is in use by {_holder(fd)}; wait for it or {hint}") from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={since}\n".encode(), 0)
        _held[folder] = 1
        try:
            yield
        finally:
            del _held[folder]
    finally:
        os.close(fd)  # releases the flock
