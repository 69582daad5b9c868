"""The pointing game: does a word's heatmap peak inside the box of the object it names? Scored on scenes
(image + caption + ``meta["objects"]``, e.g. emoji-scenes:test) for four kinds of map, next to chance and a
word-blind control, plus a frame-alignment check on zooming clips (docs/localization.md).

Maps per object word: its tokens in the caption (``pointing_game``), the same minus the caption's map
(``_contrastive``), the word encoded as a text of its own (``_phrase``: no caption context leaks into it), and
window scoring (``_windows``: the word's retrieval embedding against image crops, eval/windows.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from codebridge.config import ConfigError
from codebridge.data.sample import Sample
from codebridge.eval.localization import (
    Box,
    caption_word_maps,
    content_positions,
    contrastive_map,
    encode_features,
    grid_size,
    inference,
    inside_box,
    patch_centres,
    position_similarity,
    word_map,
    word_positions,
)
from codebridge.eval.windows import DEFAULT_WINDOW, window_maps
from codebridge.models.features import Features

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

Metrics = dict[str, float]
ZOOMS = ("zooming in", "zooming out")  # the clip motions whose object size changes over time


# ------------------------------------------------------------------------------------------------ scoring
def tied_hit(scores: Tensor, target: Tensor) -> float:
    """Is the maximum of ``scores`` [N] on a ``target`` [N] cell? Ties share the credit, so a flat map scores the
    fraction of target cells rather than whatever cell comes first."""
    best = scores == scores.max()
    return target[best].double().mean().item()


def pointing_hit(heat: Tensor, box: Box, size: tuple[int, int]) -> float:
    """1 when the centre of the heatmap's [G, G] maximum patch lies in ``box`` (ties: the fraction that do)."""
    return tied_hit(heat.flatten(), inside_box(patch_centres(size, heat.shape[-1]), box))


def box_fraction(box: Box, size: tuple[int, int]) -> float:
    """Area of ``box`` over the image area: the chance that a uniformly random point hits it."""
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / (size[0] * size[1])


def pointing_game(heats: Sequence[Tensor], boxes: Sequence[Box], sizes: Sequence[tuple[int, int]]) -> Metrics:
    """Accuracy of ``pointing_hit`` over objects, next to two chance levels: the mean box-area fraction
    (``pointing_game_random``) and the mean fraction of patch centres in the box (``..._random_patches``, the exact
    chance of pointing at a uniformly random patch)."""
    if not heats:
        raise ValueError("the pointing game needs at least one object")
    n = len(heats)
    grids = [h.shape[-1] for h in heats]
    return {
        "pointing_game": sum(pointing_hit(h, b, s) for h, b, s in zip(heats, boxes, sizes, strict=True)) / n,
        "pointing_game_random": sum(box_fraction(b, s) for b, s in zip(boxes, sizes, strict=True)) / n,
        "pointing_game_random_patches": sum(
            inside_box(patch_centres(s, g), b).double().mean().item()
            for b, s, g in zip(boxes, sizes, grids, strict=True)
        )
        / n,
        "n_objects": float(n),
    }


# ------------------------------------------------------------------------------------------------ evaluation
def _scene_objects(sample: Sample) -> list[dict[str, Any]]:
    objects = sample.meta.get("objects")
    for i, obj in enumerate(objects):
        missing = [k for k in ("span", "box") if k not in obj]
        if missing:
            raise ValueError(
                f"{sample.source}: meta objects[{i}] lacks {', '.join(missing)}; each object needs "
                "span [start, end] (characters of the caption) and box [x0, y0, x1, y1] (pixels)"
            )
    return objects


def phrase_maps(model: CodeBridgeModel, images: list[Image.Image], phrases: list[list[str]]) -> list[list[Tensor]]:
    """[G, G] map of each phrase encoded as a text of its own over its image: the word without the caption's
    context, so its tokens cannot carry the other objects."""
    owner = [b for b, group in enumerate(phrases) for _ in group]
    image = encode_features(model, "image", images)
    image = Features(image.tokens[owner], image.mask[owner], image.summary[owner])
    text = encode_features(model, "text", [p for group in phrases for p in group])
    sim = position_similarity(model, "text", text, "image", image)
    grid = grid_size(sim.shape[-1])
    flat = iter(
        [word_map(sim[i], content_positions(text.mask[i]) or [0]).view(grid, grid).cpu() for i in range(len(owner))]
    )
    return [[next(flat) for _ in group] for group in phrases]


def unrelated_phrases(phrases: list[list[str]]) -> list[list[str]] | None:
    """For each scene, one object word per object taken from the *following* scenes (cyclically), never a word of its
    own: the phrase maps of these words are the word-blind control of the phrase method. A map that merely picks the
    most salient object scores the same with them; only maps that find the named object beat it. None when no scene
    has a word of another scene to borrow (a single scene)."""
    borrowed = []
    for b, own in enumerate(phrases):
        later = [w for group in phrases[b + 1 :] + phrases[:b] for w in group if w not in own]
        if not later:
            return None
        borrowed.append([later[j % len(later)] for j in range(len(own))])
    return borrowed


def evaluate_scenes(
    model: CodeBridgeModel, samples: list[Sample], batch_size: int = 64, window: float = DEFAULT_WINDOW
) -> Metrics:
    """The pointing game over every object word of image + caption samples with ``meta["objects"]``; objects whose
    words fall past the text context are counted in ``n_objects_truncated`` and left out of every key.

    ``pointing_game_caption_map`` is a word-blind control: the same game with every object given the map of its
    whole caption. It is far above ``pointing_game_random`` whenever a map merely prefers objects to background;
    only word maps that beat it localize *the named* object. ``pointing_game_contrastive`` plays with
    ``contrastive_map`` (word minus caption), ``pointing_game_phrase`` with ``phrase_maps`` and
    ``pointing_game_windows`` with ``window_maps`` (windows of side ``window`` x the image side).
    ``pointing_game_phrase_control`` is the phrase method's own word-blind control: every object gets the phrase
    map of an object word from another scene (``unrelated_phrases``), absent from its image.
    """
    games: dict[str, list[Tensor]] = defaultdict(list)
    texts = [s.media["text"][0] for s in samples]
    scene_objects = [_scene_objects(s) for s in samples]
    scene_phrases = [
        [text[o["span"][0] : o["span"][1]] for o in objs] for text, objs in zip(texts, scene_objects, strict=True)
    ]
    borrowed = unrelated_phrases(scene_phrases)
    boxes, sizes, truncated = [], [], 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = [model.preprocessors["image"].load(s.media["image"]) for s in chunk]
        captions, objects = texts[i : i + batch_size], scene_objects[i : i + batch_size]
        phrases = scene_phrases[i : i + batch_size]
        maps = caption_word_maps(model, images, captions, [[o["span"] for o in objs] for objs in objects])
        alone = phrase_maps(model, images, phrases)
        blind = phrase_maps(model, images, borrowed[i : i + batch_size]) if borrowed else [None] * len(chunk)
        for img, objs, found, words, own, other in zip(images, objects, maps, phrases, alone, blind, strict=True):
            windows = window_maps(model, img, model.encode("text", words), found.caption.shape[-1], window)
            for j, (obj, heat) in enumerate(zip(objs, found.words, strict=True)):
                if heat is None:
                    truncated += 1
                    continue
                games[""].append(heat)
                games["_caption_map"].append(found.caption)
                games["_contrastive"].append(contrastive_map(heat, found.caption))
                games["_phrase"].append(own[j])
                games["_windows"].append(windows[j])
                if other is not None:
                    games["_phrase_control"].append(other[j])
                boxes.append(obj["box"])
                sizes.append(img.size)
    if not boxes:
        raise ConfigError(
            f"none of the {truncated} object words fits prep.text.context_length="
            f"{model.cfg.prep.text.context_length}; train with a longer context to run the pointing game"
        )
    scores = {
        f"pointing_game{key}": pointing_game(heats, boxes, sizes)["pointing_game"] for key, heats in games.items()
    }
    return pointing_game(games[""], boxes, sizes) | scores | {"n_objects_truncated": float(truncated)}


def zoom_target(motion: str, frames: int) -> Tensor:
    """[T] bool: the sampled frames in which a zooming object is large (zooming in: the later half; zooming out:
    the earlier half; the middle frame of an odd count is in neither)."""
    if motion not in ZOOMS:
        raise ValueError(f"{motion!r} is not one of {', '.join(ZOOMS)}")
    order = torch.arange(frames)
    return order >= math.ceil(frames / 2) if motion == "zooming in" else order < frames // 2


def evaluate_clips(model: CodeBridgeModel, samples: list[Sample], batch_size: int = 32) -> Metrics:
    """Zooming clips: does the object word align best with the frames where the object is large? Chance is the
    fraction of such frames (0.5 for an even frame count). Moving and rotating objects look alike in every frame,
    so they have no frame to point at and are not scored."""
    zooms = [s for s in samples if s.meta["motion"] in ZOOMS]
    hits, chance = [], []
    for i in range(0, len(zooms), batch_size):
        chunk = zooms[i : i + batch_size]
        captions = [s.media["text"][0] for s in chunk]
        video = encode_features(model, "video", [s.media["video"] for s in chunk])
        text = encode_features(model, "text", captions)
        sim = position_similarity(model, "text", text, "video", video)
        for b, sample in enumerate(chunk):
            motion, caption = sample.meta["motion"], captions[b]
            if not caption.endswith(" " + motion):
                raise ValueError(f"{sample.source}: caption {caption!r} does not end with its motion {motion!r}")
            positions = word_positions(model.tokenizer, caption, (0, len(caption) - len(motion) - 1))
            if not positions:
                continue
            target = zoom_target(motion, sim.shape[-1])
            hits.append(tied_hit(word_map(sim[b], positions).cpu(), target))
            chance.append(target.double().mean().item())
    if not hits:
        return {"n_zoom_clips": 0.0}
    return {
        "clips_zoom_pointing": sum(hits) / len(hits),
        "clips_zoom_pointing_random": sum(chance) / len(chance),
        "n_zoom_clips": float(len(hits)),
    }


def evaluate_localization(
    model: CodeBridgeModel, samples: list[Sample], batch_size: int = 64, window: float = DEFAULT_WINDOW
) -> Metrics:
    """Flat metrics: the pointing game on scenes (image + caption + ``meta["objects"]``, e.g. emoji-scenes:test)
    and/or the zoom alignment on clips (video + caption + ``meta["motion"]``, e.g. emoji-clips:test)."""
    scenes = [s for s in samples if s.has("image") and s.has("text") and s.meta.get("objects")]
    clips = [s for s in samples if s.has("video") and s.has("text") and "motion" in s.meta]
    if not scenes and not clips:
        raise ConfigError(
            "localization needs scenes (image + caption with meta objects holding span and box, e.g. "
            "emoji-scenes:test) or clips (video + caption with meta motion, e.g. emoji-clips:test)"
        )
    metrics: Metrics = {}
    with inference(model):
        if scenes:
            metrics |= evaluate_scenes(model, scenes, batch_size, window)
        if clips:
            metrics |= evaluate_clips(model, clips, batch_size)
    return metrics
