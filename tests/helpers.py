"""Small helpers shared by several test files (imported as ``from helpers import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from codebridge.config import Config


def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``): torchrun starts each worker in a session of its own, so
    killing the launcher's process group would leave its workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants at once, as when their machine dies."""
    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def small_config() -> Config:
    """Defaults shrunk to 16 px / width 16 / one layer: untrained models that embed hundreds of items in a second."""
    cfg = Config()
    cfg.prep.image.size = cfg.prep.video.size = 16
    cfg.prep.video.frames = 3
    cfg.prep.audio.max_seconds = 0.5
    cfg.prep.text.vocab_size = 300
    for enc in (cfg.model.image, cfg.model.text, cfg.model.audio):
        enc.width, enc.depth, enc.heads = 16, 1, 2
    cfg.model.image.patch_size = 8
    cfg.model.video.heads = 2
    cfg.model.bridge.embed_dim = 8
    return cfg


def small_bridge_config(bridge: str) -> Config:
    """``small_config`` with the bridge ``bridge`` and its discrete space shrunk to 16 codes/tokens (FDT dim 8)."""
    cfg = small_config()
    cfg.model.bridge.name = bridge
    cfg.model.bridge.codebook.size = 16
    cfg.model.bridge.fdt.num_tokens, cfg.model.bridge.fdt.dim = 16, 8
    return cfg


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs with ``options`` (``size=1m``, ``ro``) on ``folder`` when this process may (root with
    CAP_SYS_ADMIN); yields whether it did, so a test can fall back to a simulation and say so."""
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    mounted = shutil.which("mount") is not None and subprocess.run(command, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)
