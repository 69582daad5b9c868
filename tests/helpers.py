"""Small helpers shared by several test files (imported as ``from helpers import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import socket

from codebridge.config import Config


def free_port() -> int:
    """A free TCP port on the loopback interface, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
