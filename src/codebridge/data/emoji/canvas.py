"""Pixel helpers shared by the image, scene and clip stages: load art, pick backgrounds, paste with alpha."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

WHITE = (255, 255, 255)
Color = tuple[int, int, int]


def load_rgba(path: str | Path, size: int | None = None) -> Image.Image:
    """The art as RGBA (palette PNGs converted), resized with Lanczos when ``size`` differs."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    if size is not None and rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    return rgba


def light_color(rng: random.Random) -> Color:
    """A random light background, so models cannot rely on pure white around every object."""
    return (rng.randint(215, 255), rng.randint(215, 255), rng.randint(215, 255))


def paste(canvas: Image.Image, art: Image.Image, x: int, y: int) -> None:
    """Alpha-composite ``art`` onto the RGB ``canvas`` with its top-left corner at (x, y)."""
    canvas.paste(art, (x, y), art)


def flatten(art: Image.Image, color: Color = WHITE) -> Image.Image:
    """RGB image of ``art`` composited on a plain ``color`` background."""
    canvas = Image.new("RGB", art.size, color)
    paste(canvas, art, 0, 0)
    return canvas
