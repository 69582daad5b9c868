"""Rendering localization maps: a patch-grid heatmap over its image, a score strip under video frames, and a
titled panel of several such pictures (PNG via PIL and matplotlib's object API: no pyplot, no display).

Maps are min-max normalised one by one: colours show where a word points *within* one picture, not how strongly
compared with another word. The model sees the centre square of an image, so the heat covers that square.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from codebridge.data.modalities.image import centre_square
from codebridge.files import atomic_path

CMAP = "jet"


def normalise(values: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the finite values (non-finite ones become 0; a flat map is all 0)."""
    values = values.double()
    finite = torch.isfinite(values)
    if not finite.any():
        return torch.zeros_like(values)
    low, high = values[finite].min(), values[finite].max()
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    return scaled.masked_fill(~finite, 0.0)


def heat_array(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[H, W] heat in [0, 1] for an image of ``size`` (W, H): the [G, G] grid bilinearly upsampled onto the centre
    square, NaN outside it."""
    width, height = size
    left, top, right, _ = (round(v) for v in centre_square(width, height))
    side = right - left
    heat = F.interpolate(normalise(grid)[None, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    out = np.full((height, width), np.nan, dtype=np.float32)
    out[top : top + side, left : left + side] = heat[0, 0].clamp(0, 1).numpy()
    return out


def colour(values: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """uint8 RGB [..., 3] of values in [0, 1]."""
    return (matplotlib.colormaps[cmap](values)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, grid: torch.Tensor, alpha: float = 0.5, cmap: str = CMAP) -> Image.Image:
    """The image (RGB, its own size) with the heatmap blended on at ``alpha``; pixels outside the heat are kept."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = heat_array(grid, image.size)
    covered = ~np.isnan(heat)
    tint = colour(np.nan_to_num(heat), cmap).astype(np.float32)
    blended = np.where(covered[..., None], (1 - alpha) * base + alpha * tint, base)
    return Image.fromarray(blended.round().astype(np.uint8))


def save_overlay(image: Image.Image, grid: torch.Tensor, path: str | Path, alpha: float = 0.5) -> Path:
    """Write ``overlay`` as a PNG of the input image's size."""
    path = Path(path)
    with atomic_path(path) as tmp:
        overlay(image, grid, alpha).save(tmp, format="PNG")
    return path


def frame_strip(
    frames: Sequence[Image.Image], scores: torch.Tensor, height: int = 64, bar: int = 10, cmap: str = CMAP
) -> Image.Image:
    """Frames side by side at ``height`` px, each above a bar coloured by its normalised score (red = highest)."""
    if len(frames) != len(scores):
        raise ValueError(f"{len(frames)} frames but {len(scores)} scores")
    tints = colour(normalise(scores.flatten().cpu()).numpy(), cmap)
    strip = Image.new("RGB", (height * len(frames), height + bar), "white")
    for i, (frame, tint) in enumerate(zip(frames, tints, strict=True)):
        strip.paste(frame.convert("RGB").resize((height, height), Image.Resampling.BILINEAR), (i * height, 0))
        strip.paste(Image.new("RGB", (height, bar), tuple(int(c) for c in tint)), (i * height, height))
    return strip


def save_panels(panels: Sequence[tuple[str, Image.Image]], path: str | Path, columns: int = 4) -> Path:
    """One PNG with every (title, picture) in a grid of ``columns``."""
    if not panels:
        raise ValueError("no panels to draw")
    path = Path(path)
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    aspect = max(p.width / p.height for _, p in panels)
    fig = Figure(figsize=(2.6 * aspect * columns, 2.9 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, picture) in zip(axes.flat, panels, strict=False):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
