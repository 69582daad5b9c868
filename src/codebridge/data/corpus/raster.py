"""Images of the corpus: an SVG (rasterised with cairosvg) or a PNG, fitted into a square on white, as PNG bytes.

Bytes depend only on the job (and the cairo/Pillow versions), so any number of workers gives the same shards.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from codebridge.data.emoji.canvas import flatten, load_rgba


@dataclass(frozen=True)
class RasterJob:
    svg: str = ""  # an SVG document, or
    png: str = ""  # a PNG file path
    size: int = 64
    hflip: bool = False
    vflip: bool = False
    rotate: int = 0  # quarter turns clockwise


def _svg_rgba(svg: str, size: int) -> Image.Image:
    import cairosvg  # needs the cairo library (Debian libcairo2); imported here so the rest of codebridge does not

    data = cairosvg.svg2png(bytestring=svg.encode("utf-8"), output_width=size, output_height=size)
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGBA")


def _fit(art: Image.Image, size: int) -> Image.Image:
    """``art`` scaled to fit a ``size`` square, keeping its aspect ratio (a 4:3 flag is letterboxed)."""
    if art.size == (size, size):
        return art
    scale = size / max(art.size)
    width, height = max(1, round(art.width * scale)), max(1, round(art.height * scale))
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(art.resize((width, height), Image.Resampling.LANCZOS), ((size - width) // 2, (size - height) // 2))
    return canvas


def render(job: RasterJob) -> bytes:
    """Worker: the job's art as an RGB PNG of ``size`` x ``size`` composited on white."""
    art = _svg_rgba(job.svg, job.size) if job.svg else load_rgba(job.png)
    if job.hflip:
        art = art.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if job.vflip:
        art = art.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if job.rotate % 4:
        art = art.rotate(-90 * (job.rotate % 4), expand=True)
    out = io.BytesIO()
    flatten(_fit(art, job.size)).save(out, format="PNG")
    return out.getvalue()
