"""A tiny collection (drawn images, one caption each) and an untrained tiny model, shared by the search tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.models.model import CodeBridgeModel
from helpers import small_config


def caption(i: int) -> str:
    return f"item {i} word{i % 13} thing{i % 7}"


def make_collection(root: Path, n: int) -> Path:
    """``root/pairs.csv`` naming ``n`` distinct 24 px PNGs with distinct captions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["filepath,title"]
    for i in range(n):
        img = Image.new("RGB", (24, 24), tuple(int(c) for c in rng.integers(0, 256, 3)))
        ImageDraw.Draw(img).rectangle((i % 10, i % 7, 20, 20), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(root / f"{i}.png")
        rows.append(f"{i}.png,{caption(i)}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def make_model(folder: Path, n: int = 200, seed: int = 0, bridge: str = "clip") -> Path:
    """An untrained tiny image-text model saved in ``folder`` (its tokenizer knows the captions)."""
    cfg = small_config()
    cfg.model.bridge.name = bridge
    cfg.model.bridge.codebook.size = 12
    cfg.model.bridge.fdt.num_tokens, cfg.model.bridge.fdt.dim = 12, 8
    torch.manual_seed(seed)
    tokenizer = Tokenizer.train([caption(i) for i in range(n)], cfg.prep.text)
    CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, tokenizer)).save(folder)
    return folder
