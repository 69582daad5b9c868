"""One writer per output folder: a second holder is refused with who holds it; a SIGKILLed holder frees it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from codebridge.lock import LOCK_FILE, FolderInUse, folder_lock

HOLD = """
import sys, time
from codebridge.lock import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_held_folder_is_refused_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse) as refused, folder_lock(tmp_path):
            pass
        message = str(refused.value)
        assert message.startswith(
            f"output_dir {tmp_path.resolve()} is in use by pid {holder.pid} on host {socket.gethostname()} since "
        )
        assert message.endswith("; wait for it or choose another output_dir") and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        assert holder.wait() == -signal.SIGKILL
    with folder_lock(tmp_path):  # the kernel dropped the lock with the process: no stale lock to clean up
        assert f"pid={os.getpid()} " in (tmp_path / LOCK_FILE).read_text()


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with folder_lock(tmp_path), folder_lock(tmp_path / "." / ""):
        pass
    with folder_lock(tmp_path):
        pass
