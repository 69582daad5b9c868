"""Small helpers shared by several test files (imported as ``from helpers import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
