"""``codebridge localize``: where in an image (or in which video frames) each word of a text, or each part of a
spoken utterance, is found, drawn as heatmaps over the input (one PNG) with the raw maps beside it (JSON).

What is looked *for* is a text (one map per word, plus the whole text) or a speech file (the whole utterance and
equal time segments of it, since speech has no word boundaries); what is looked *in* is an image (patch
heatmaps) or a video (a score strip under its sampled frames). How each bridge scores positions is in
eval/localization.py and docs/localization.md.

Three methods: ``tokens`` (default) reads each word's tokens inside the whole text, so the words carry their
context; ``phrases`` encodes each word as a text of its own; ``windows`` scores the retrieval similarity of each
word (or the whole utterance) with image crops centred on each patch (eval/windows.py). The last two need an image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from codebridge.config import ConfigError
from codebridge.data.modalities.video import uniform_indices
from codebridge.eval.heatmap import frame_strip, overlay, save_panels
from codebridge.eval.localization import (
    content_positions,
    encode_features,
    grid_size,
    inference,
    position_similarity,
    word_map,
    word_positions,
)
from codebridge.eval.pointing import phrase_maps
from codebridge.eval.windows import DEFAULT_WINDOW, model_grid, window_maps
from codebridge.files import atomic_write_json

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

Units = list[tuple[str, list[int]]]  # (label, query positions)
Maps = list[tuple[str, torch.Tensor]]  # (label, [G, G] or [T] map)
METHODS = ("tokens", "phrases", "windows")


def text_units(model: CodeBridgeModel, text: str, mask: torch.Tensor) -> tuple[Units, list[str]]:
    """The whole text and each whitespace-separated word; also the words cut off by the context length."""
    units: Units = [("whole text", content_positions(mask))]
    skipped = []
    for match in re.finditer(r"\S+", text):
        positions = word_positions(model.tokenizer, text, match.span())
        if positions:
            units.append((match.group(), positions))
        else:
            skipped.append(match.group())
    return units, skipped


def speech_units(mask: torch.Tensor, segments: int = 4) -> Units:
    """The whole utterance and ``segments`` equal parts of its real frames, in time order."""
    frames = mask.nonzero().flatten().tolist()
    segments = max(1, min(segments, len(frames)))
    size = len(frames) / segments
    parts = [frames[round(i * size) : round((i + 1) * size)] for i in range(segments)]
    return [("whole speech", frames)] + [(f"speech part {i + 1}/{segments}", p) for i, p in enumerate(parts)]


def query_maps(
    model: CodeBridgeModel, query: str, query_item: Any, target: str, target_item: Any, segments: int = 4
) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """(label, map) per query unit: [G, G] over an image's patches or [T] over a video's frames; and the words
    left out because they lie past the text context."""
    with inference(model):
        q = encode_features(model, query, [query_item])
        t = encode_features(model, target, [target_item])
        sim = position_similarity(model, query, q, target, t)[0].cpu()
    if query == "text":
        units, skipped = text_units(model, query_item, q.mask[0].cpu())
    else:
        units, skipped = speech_units(q.mask[0].cpu(), segments), []
    shape = (grid_size(sim.shape[-1]),) * 2 if target == "image" else (sim.shape[-1],)
    return [(label, word_map(sim, positions).view(shape)) for label, positions in units if positions], skipped


def separate_maps(
    model: CodeBridgeModel, method: str, query: str, query_item: Any, image_item: Any, window: float
) -> Maps:
    """``phrases`` or ``windows`` maps [G, G] over an image: the whole text and each word encoded on its own (or,
    for windows with speech, the whole utterance)."""
    if query == "audio" and method == "phrases":
        raise ConfigError("--method phrases needs --text; for speech use tokens or windows")
    image = model.preprocessors["image"].load(image_item)
    if query == "text":
        labels, items = ["whole text", *query_item.split()], [query_item, *query_item.split()]
    else:
        labels, items = ["whole speech"], [query_item]
    with inference(model):
        if method == "phrases":
            maps = phrase_maps(model, [image], [items])[0]
        else:
            maps = list(window_maps(model, image, model.encode(query, items), model_grid(model), window))
    return list(zip(labels, maps, strict=True))


def _pair(image: Any, text: Any, audio: Any, video: Any) -> tuple[str, Any, str, Any]:
    queries = {m: v for m, v in (("text", text), ("audio", audio)) if v is not None}
    targets = {m: v for m, v in (("image", image), ("video", video)) if v is not None}
    if len(queries) != 1 or len(targets) != 1:
        raise ConfigError(
            "localize needs one input to look in (--image or --video) and one to look for (--text or --audio); "
            f"got {', '.join(sorted(queries | targets)) or 'none'}"
        )
    (query, query_item), (target, target_item) = *queries.items(), *targets.items()
    for path in (query_item if query == "audio" else None, target_item):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
    return query, query_item, target, target_item


def localize_cli(
    model_dir: str | Path,
    image: str | Path | None = None,
    text: str | None = None,
    audio: str | Path | None = None,
    video: str | Path | None = None,
    out: str | Path = "heat.png",
    segments: int = 4,
    method: str = "tokens",
    window: float = DEFAULT_WINDOW,
) -> dict[str, Any]:
    """Load the model, localize the query in the target and write ``out`` (PNG panels) and ``out`` with suffix
    .json (the raw maps). Returns {"png", "json", "maps": [labels], "skipped": [words past the context]}.

    ``method``: tokens, phrases or windows (module docstring); ``window``: the windows' side over the image side.
    """
    import codebridge

    if method not in METHODS:
        raise ConfigError(f"unknown localization method {method!r}; choose one of {', '.join(METHODS)}")
    query, query_item, target, target_item = _pair(image, text, audio, video)
    if method != "tokens" and target != "image":
        raise ConfigError(f"--method {method} localizes in an image; for --video use --method tokens")
    query_item = str(query_item)
    model = codebridge.load(model_dir)
    if query not in model.modalities or target not in model.modalities:
        raise ConfigError(
            f"{model_dir}: this model has {', '.join(model.modalities)}; it cannot localize {query} in {target}"
        )
    if method == "tokens":
        maps, skipped = query_maps(model, query, query_item, target, str(target_item), segments)
    else:
        maps, skipped = separate_maps(model, method, query, query_item, str(target_item), window), []
    if target == "image":
        picture = model.preprocessors["image"].load(str(target_item))
        panels = [("input", picture)] + [(label, overlay(picture, heat)) for label, heat in maps]
        columns = 4
    else:
        frames = model.preprocessors["video"].load(str(target_item))
        shown = [Image.fromarray(frames[i]) for i in uniform_indices(len(frames), model.cfg.prep.video.frames)]
        panels = [(label, frame_strip(shown, scores)) for label, scores in maps]
        columns = 1
    png = save_panels(panels, out, columns=columns)
    raw = png.with_suffix(".json")
    record = {
        "query": query,
        "target": target,
        "method": method,
        "skipped": skipped,
        "maps": [{"label": k, "map": v.tolist()} for k, v in maps],
    }
    atomic_write_json(raw, record, indent=1)
    return {"png": png, "json": raw, "maps": [label for label, _ in maps], "skipped": skipped}
