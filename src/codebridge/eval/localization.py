"""Cross-modal localization without labels: which image patches (or video frames) a word or a spoken frame
matches, read off each bridge's shared space, and the pointing game that scores it against ground-truth boxes.

Position similarity ``sim[b, q, t]`` between query positions (words, audio frames) and target positions
(patches, video frames) is the bridge's own ``affinity`` (models/bridges/, docs/localization.md): code posteriors
for ``codebook``, FDT weights against grounding scores for ``fdt``, projected-token cosines for ``clip``. A bridge
without one (``affinity`` returns None) cannot draw word maps; window scoring (eval/windows.py) still works.

A word's map is the mean of its tokens' rows; a heatmap is that map on the patch grid [G, G]. The pointing game
that scores maps against boxes is in eval/pointing.py; window scoring, the summary-only alternative, in
eval/windows.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from codebridge.config import ConfigError
from codebridge.data.modalities.image import centre_square
from codebridge.data.modalities.text import Tokenizer
from codebridge.models.bridges.base import DiscreteSpace
from codebridge.models.features import Features

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

Box = Sequence[float]  # x0, y0, x1, y1 in source-image pixels


# ------------------------------------------------------------------------------------------------ encoding
@contextmanager
def inference(model: CodeBridgeModel) -> Iterator[None]:
    """Eval mode without gradients, restoring the model's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_features(model: CodeBridgeModel, modality: str, items: list[Any]) -> Features:
    """Encoder features of raw items (paths, PIL images, strings) with the model's eval preprocessing."""
    from codebridge.models.model import prepare_batch

    if modality not in model.encoders:
        raise ConfigError(f"this model has no {modality} encoder; its modalities are {', '.join(model.modalities)}")
    entry = prepare_batch(model.preprocessors, modality, items)
    return model.features(modality, entry)


def grid_size(num_patches: int) -> int:
    """Side G of the square patch grid of ``num_patches`` image tokens."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} image tokens do not form a square patch grid")
    return side


# ------------------------------------------------------------------------------------------------ shared space
def discrete_space(model: CodeBridgeModel) -> DiscreteSpace:
    """The bridge's shared codes/tokens; a ConfigError when it has none."""
    space = model.bridge.discrete_space()
    if space is None:
        raise ConfigError(
            f"the {model.cfg.model.bridge.name} bridge has no codes or tokens to analyse (its discrete_space() is "
            "None); run --task codes on a bridge with a discrete space (bridges with a position affinity can still be "
            "localized: --task localization)"
        )
    return space


def code_affinity(model: CodeBridgeModel, modality: str, features: Features) -> Tensor:
    """[B, T, K] how strongly each position belongs to each code or token (the bridge's ``DiscreteSpace.scores``);
    its argmax is the position's code. Padded rows are 0 (use ``features.mask``)."""
    return discrete_space(model).scores(modality, features)


def position_similarity(model: CodeBridgeModel, query: str, q: Features, target: str, t: Features) -> Tensor:
    """[B, Tq, Tt] similarity of every query position to every target position of the same pair (the bridge's
    ``affinity``); padded target positions are -inf, padded query rows are meaningless."""
    sim = model.bridge.affinity(query, q, target, t)
    if sim is None:
        raise ConfigError(
            f"the {model.cfg.model.bridge.name} bridge has no position affinity (its affinity() is None), so it "
            "cannot map words onto patches or frames; localize with window scoring instead (codebridge localize "
            "--method windows)"
        )
    return sim.masked_fill(~t.mask.bool().unsqueeze(1), float("-inf"))


# ------------------------------------------------------------------------------------------------ words
def _token_count(tokenizer: Tokenizer, text: str) -> int | None:
    """Tokens of ``text`` between <sot> and <eot>; None when truncation drops some of them."""
    if not tokenizer.normalize(text):
        return 0
    ids, mask = tokenizer.encode([text])
    if tokenizer.decode(ids[0]) != tokenizer.normalize(text):
        return None
    return int(mask.sum()) - 2


def word_positions(tokenizer: Tokenizer, text: str, span: Sequence[int]) -> list[int] | None:
    """Positions in ``tokenizer.encode([text])`` of the tokens of the characters ``text[start:end]``.

    The prefixes ``text[:start]`` and ``text[:end]`` are re-tokenized and their lengths subtracted; byte-level BPE
    never merges across a pre-tokenizer (word) boundary, so this is exact for spans on word boundaries. None when
    the span lies (partly) past the context length.
    """
    start, end = int(span[0]), int(span[1])
    if not 0 <= start < end <= len(text):
        raise ValueError(f"span {[start, end]} is not a non-empty range of the {len(text)} characters of {text!r}")
    before, upto = _token_count(tokenizer, text[:start]), _token_count(tokenizer, text[:end])
    if before is None or upto is None:
        return None
    return list(range(1 + before, 1 + upto))  # +1: <sot>


# ------------------------------------------------------------------------------------------------ patch geometry
def patch_boxes(size: tuple[int, int], grid: int) -> Tensor:
    """[G*G, 4] source-pixel boxes (x0, y0, x1, y1) of the patches, row-major; the model sees the centre square."""
    left, top, right, _ = centre_square(*size)
    step = (right - left) / grid
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x0, y0 = left + cols.flatten() * step, top + rows.flatten() * step
    return torch.stack([x0, y0, x0 + step, y0 + step], -1).double()


def inside_box(points: Tensor, box: Box) -> Tensor:
    """[N] bool: which (x, y) points [N, 2] lie in the box (edges included)."""
    x0, y0, x1, y1 = box
    return (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)


def patch_centres(size: tuple[int, int], grid: int) -> Tensor:
    boxes = patch_boxes(size, grid)
    return (boxes[:, :2] + boxes[:, 2:]) / 2


# ------------------------------------------------------------------------------------------------ maps
def word_map(sim: Tensor, positions: Sequence[int]) -> Tensor:
    """[Tt] mean similarity of the word's query rows to every target position."""
    return sim[list(positions)].mean(0)


def contrastive_map(word: Tensor, caption: Tensor) -> Tensor:
    """The word's map minus its caption's: where this word points *more than the caption as a whole does*.

    Text tokens are contextualised, so every word's map carries the caption's saliency (objects over background);
    the difference removes that shared part and keeps what is specific to the word."""
    return word - caption


def content_positions(mask: Tensor) -> list[int]:
    """Positions of a caption's real tokens between <sot> and <eot> (``mask`` [L] of one caption)."""
    return list(range(1, int(mask.sum()) - 1))


@dataclass
class CaptionMaps:
    """Heatmaps [G, G] of one caption over its image: the whole caption's and one per span (None: truncated)."""

    caption: Tensor
    words: list[Tensor | None]


def caption_word_maps(
    model: CodeBridgeModel, images: list[Image.Image], captions: list[str], spans: list[list[Sequence[int]]]
) -> list[CaptionMaps]:
    """Per image and its caption: the map of the caption's content tokens and of each character span."""
    image, text = encode_features(model, "image", images), encode_features(model, "text", captions)
    sim = position_similarity(model, "text", text, "image", image)
    grid = grid_size(sim.shape[-1])
    out = []
    for b, (caption, caption_spans) in enumerate(zip(captions, spans, strict=True)):
        words = []
        for span in caption_spans:
            positions = word_positions(model.tokenizer, caption, span)
            words.append(None if not positions else word_map(sim[b], positions).view(grid, grid).cpu())
        whole = word_map(sim[b], content_positions(text.mask[b]) or [0]).view(grid, grid).cpu()
        out.append(CaptionMaps(whole, words))
    return out
