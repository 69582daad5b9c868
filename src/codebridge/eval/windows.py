"""Localization by window scoring: the query's retrieval embedding against crops of the image centred on each
patch. A map [G, G] on the same patch grid as the token maps, so the pointing game treats both alike.

Why: token maps need the encoders' fine-grained positions to live in the shared space, and on the emoji scenes
they barely beat the word-blind caption map (docs/localization.md). Window scoring uses only what every bridge is
trained for, the summary similarity of an image and a text (for ``fdt``: the overlap of their sparse token
weights; for ``codebook``: of their code-averaged embeddings), at the price of one image forward pass per window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image
from torch import Tensor

from codebridge.eval.localization import patch_centres

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

DEFAULT_WINDOW = 0.25  # window side over the image side the model sees; chosen on emoji-scenes:train


def window_boxes(size: tuple[int, int], grid: int, fraction: float) -> list[tuple[int, int, int, int]]:
    """Pixel boxes of side ``fraction`` x the centre square's side, centred on each of the G x G patch centres
    (row-major); border windows reach past the image (``window_crops`` pads them)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"window fraction {fraction} must be in (0, 1]: the window side over the image side")
    half = fraction * min(size) / 2
    return [
        (round(x - half), round(y - half), round(x + half), round(y + half))
        for x, y in patch_centres(size, grid).tolist()
    ]


def window_crops(image: Image.Image, grid: int, fraction: float, background: tuple[int, int, int]) -> list[Image.Image]:
    """The G x G windows of ``image``; outside the image they show ``background`` so every window stays centred
    on its patch."""
    boxes = window_boxes(image.size, grid, fraction)
    pad = max(0, -min(min(b[:2]) for b in boxes), max(max(b[2] - image.size[0], b[3] - image.size[1]) for b in boxes))
    canvas = Image.new("RGB", (image.size[0] + 2 * pad, image.size[1] + 2 * pad), background)
    canvas.paste(image.convert("RGB"), (pad, pad))
    return [canvas.crop((x0 + pad, y0 + pad, x1 + pad, y1 + pad)) for x0, y0, x1, y1 in boxes]


def window_maps(
    model: CodeBridgeModel, image: Image.Image, queries: Tensor, grid: int, fraction: float = DEFAULT_WINDOW
) -> Tensor:
    """[Q, G, G] retrieval similarity of each query embedding (``queries`` [Q, E], from ``model.encode``) to the
    window centred on each patch of ``image``."""
    crops = window_crops(image, grid, fraction, tuple(model.cfg.prep.image.background))
    windows = model.encode("image", crops)
    return model.similarity(queries.to(windows.device), windows).view(-1, grid, grid).cpu()


def model_grid(model: CodeBridgeModel) -> int:
    """Side of the image encoder's patch grid."""
    return model.cfg.prep.image.size // model.cfg.model.image.patch_size
