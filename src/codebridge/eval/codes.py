"""Code analysis: what each element of a bridge's shared discrete space (a ``codebook`` code, an FDT token)
stands for, across modalities.

Every real position (image patch, word token, audio frame, video frame) is assigned its code: the argmax of the
bridge's ``DiscreteSpace.scores`` (``code_affinity``; the nearest codebook entry, the FDT token it grounds on most
strongly). Positions get concept labels where the data says what they show: a scene patch whose centre lies in an
object's box and the tokens of that object's words get the object's concept; in a labelled sample (one emoji + its
name) every position gets the sample's concept. <sot>/<eot> and unlabelled positions (background, "left of") take
part in usage only. Measured against these labels: NMI and purity (``sum_k max_c n_kc / N``) for concepts and groups,
overall and per modality, and the fraction of concepts whose most frequent code is the same in every modality.
Purity and NMI both rise with the number of codes used, so read them next to ``codes_used``.

A bridge without a discrete space (``clip``) has no codes; analysing it raises a ConfigError that says so.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from sklearn.metrics import normalized_mutual_info_score

from codebridge.config import ConfigError
from codebridge.data.modalities.text import SPECIAL_TOKENS
from codebridge.data.sample import Sample
from codebridge.eval.localization import (
    code_affinity,
    discrete_space,
    encode_features,
    grid_size,
    inference,
    inside_box,
    patch_boxes,
    patch_centres,
    word_positions,
)
from codebridge.files import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

SPECIAL_IDS = range(len(SPECIAL_TOKENS))  # the tokenizer numbers <pad>, <sot>, <eot>, <unk> first
GRID_FILE, CODES_FILE = "codes_grid.png", "codes.json"


# ------------------------------------------------------------------------------------------------ metrics
def purity(codes: np.ndarray, labels: np.ndarray) -> float:
    """``sum_k max_c n_kc / N``: the fraction of positions whose code's majority label is their own."""
    if len(codes) == 0:
        raise ValueError("purity of no positions")
    pairs = Counter(zip(codes.tolist(), labels.tolist(), strict=True))
    best: dict[int, int] = defaultdict(int)
    for (code, _), n in pairs.items():
        best[code] = max(best[code], n)
    return sum(best.values()) / len(codes)


def label_metrics(codes: np.ndarray, labels: np.ndarray, name: str, suffix: str = "") -> dict[str, float]:
    """``codes_nmi_{name}{suffix}`` and ``codes_purity_{name}{suffix}`` over the labelled (>= 0) positions."""
    keep = labels >= 0
    if not keep.any():
        return {}
    codes, labels = codes[keep], labels[keep]
    return {
        f"codes_nmi_{name}{suffix}": float(normalized_mutual_info_score(labels, codes)),
        f"codes_purity_{name}{suffix}": purity(codes, labels),
    }


def concept_agreement(codes: np.ndarray, modality: np.ndarray, concept: np.ndarray) -> float | None:
    """Over concepts labelled in at least two modalities: the fraction whose most frequent code is the same in
    all of them (ties: the smallest code). None when no concept is seen in two modalities."""
    dominant: dict[int, dict[int, int]] = defaultdict(dict)
    for c in np.unique(concept[concept >= 0]):
        for m in np.unique(modality[concept == c]):
            dominant[int(c)][int(m)] = int(np.bincount(codes[(concept == c) & (modality == m)]).argmax())
    shared = [set(per.values()) for per in dominant.values() if len(per) >= 2]
    return None if not shared else sum(len(s) == 1 for s in shared) / len(shared)


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of a usage histogram: the effective number of codes in use."""
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------------------------ collection
@dataclass
class TopPatches:
    """Per code, the ``top`` images whose best patch has the highest affinity to it (one patch per image)."""

    num_codes: int
    top: int
    grid: int
    scores: torch.Tensor = field(init=False)  # [K, <=top]
    where: torch.Tensor = field(init=False)  # [K, <=top, 2]: (sample index, patch index)

    def __post_init__(self) -> None:
        self.scores = torch.full((self.num_codes, 0), float("-inf"))
        self.where = torch.zeros((self.num_codes, 0, 2), dtype=torch.long)

    def add(self, affinity: torch.Tensor, first: int) -> None:
        """``affinity`` [B, T, K] of the images ``first .. first + B - 1``."""
        best, patch = affinity.cpu().max(1)  # [B, K]
        samples = torch.arange(first, first + len(best)).unsqueeze(1).expand_as(patch)
        scores = torch.cat([self.scores, best.T], 1)
        where = torch.cat([self.where, torch.stack([samples, patch], -1).transpose(0, 1)], 1)
        self.scores, order = scores.topk(min(self.top, scores.shape[1]), dim=1)
        self.where = where.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))

    def entries(self, code: int, samples: list[Sample]) -> list[dict[str, Any]]:
        """The code's top patches: sample index and key, image path, grid row and column, affinity."""
        return [
            {
                "index": i,
                "sample": samples[i].key,
                "image": samples[i].media["image"] if isinstance(samples[i].media["image"], str) else None,
                "row": p // self.grid,
                "col": p % self.grid,
                "score": score,
            }
            for (i, p), score in zip(self.where[code].tolist(), self.scores[code].tolist(), strict=True)
        ]


@dataclass
class Assignments:
    """Every real position seen: its code, modality index, concept (-1: unlabelled) and token id (text, else -1)."""

    modalities: list[str]
    num_codes: int = 0
    parts: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def add(self, modality: str, codes: np.ndarray, concept: np.ndarray, token: np.ndarray | None = None) -> None:
        index = np.full(len(codes), self.modalities.index(modality))
        self.parts.append((codes, index, concept, np.full(len(codes), -1) if token is None else token))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """codes, modality, concept, token: [P] each."""
        codes, modality, concept, token = (np.concatenate(x).astype(np.int64) for x in zip(*self.parts, strict=True))
        return codes, modality, concept, token


def _patch_concepts(sample: Sample, size: tuple[int, int], grid: int) -> np.ndarray:
    """Concept of each patch: the object whose box holds its centre, else -1; unboxed samples: their concept."""
    objects = sample.meta.get("objects")
    if not objects:
        return np.full(grid * grid, sample.labels.get("concept", -1))
    centres, out = patch_centres(size, grid), np.full(grid * grid, -1)
    for obj in objects:
        out[inside_box(centres, obj["box"]).numpy()] = obj.get("concept", -1)
    return out


def _token_concepts(model: CodeBridgeModel, sample: Sample, caption: str) -> np.ndarray:
    """Concept of each token position: the object whose span covers it, or the sample's concept; specials -1."""
    ids = model.tokenizer.encode([caption])[0][0].numpy()
    objects = sample.meta.get("objects")
    out = np.full(len(ids), -1 if objects else sample.labels.get("concept", -1))
    for obj in objects or []:
        out[word_positions(model.tokenizer, caption, obj["span"]) or []] = obj.get("concept", -1)
    out[np.isin(ids, SPECIAL_IDS)] = -1
    return out


def position_concepts(model: CodeBridgeModel, modality: str, sample: Sample, item: Any, length: int) -> np.ndarray:
    """[T] concept of each of the ``length`` positions of the sample's ``item`` in ``modality`` (-1: none)."""
    if modality == "image":
        return _patch_concepts(sample, item.size, grid_size(length))
    if modality == "text":
        return _token_concepts(model, sample, item)
    return np.full(length, sample.labels.get("concept", -1))


def _inputs(model: CodeBridgeModel, modality: str, chunk: list[Sample]) -> list[Any]:
    if modality == "image":
        return [model.preprocessors["image"].load(s.media["image"]) for s in chunk]
    return [s.media["text"][0] if modality == "text" else s.media[modality] for s in chunk]


def collect(
    model: CodeBridgeModel, samples: list[Sample], modalities: list[str], batch_size: int = 64, top: int = 8
) -> tuple[Assignments, TopPatches | None]:
    """Codes and concept labels of every real position of ``modalities``; the top patches per code (images)."""
    found, patches = Assignments(modalities), None
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        for m in modalities:
            items = _inputs(model, m, chunk)
            features = encode_features(model, m, items)
            affinity = code_affinity(model, m, features)
            found.num_codes = affinity.shape[-1]
            codes, mask = affinity.argmax(-1).cpu().numpy(), features.mask.cpu().numpy()
            if m == "image":
                patches = patches or TopPatches(affinity.shape[-1], top, grid_size(affinity.shape[1]))
                patches.add(affinity, start)
            ids = model.tokenizer.encode(items)[0].numpy() if m == "text" else None
            for b, sample in enumerate(chunk):
                keep = mask[b]
                concept = position_concepts(model, m, sample, items[b], codes.shape[1])[keep]
                found.add(m, codes[b][keep], concept, None if ids is None else ids[b][keep])
    return found, patches


# ------------------------------------------------------------------------------------------------ evaluation
def concept_names(samples: list[Sample]) -> dict[int, str]:
    """Readable concept names found in the samples: the name in meta, or the words of scene objects."""
    names = {s.labels["concept"]: s.meta["name"] for s in samples if "concept" in s.labels and "name" in s.meta}
    for s in samples:
        names |= {o["concept"]: o["word"] for o in s.meta.get("objects") or [] if "concept" in o and "word" in o}
    return names


def concept_groups(samples: list[Sample]) -> dict[int, int]:
    """concept -> group from the samples that carry both labels."""
    return {s.labels["concept"]: s.labels["group"] for s in samples if {"concept", "group"} <= s.labels.keys()}


def code_metrics(found: Assignments, groups: Mapping[int, int]) -> dict[str, float]:
    """Usage, label and agreement metrics of the collected assignments (flat ``codes_*`` keys)."""
    codes, modality, concept, _ = found.arrays()
    group = np.array([groups.get(int(c), -1) for c in concept], dtype=np.int64)
    usage = np.bincount(codes, minlength=found.num_codes)
    metrics = {
        "codes_used": float((usage > 0).sum()),
        "codes_used_fraction": float((usage > 0).mean()),
        "codes_perplexity": perplexity(usage),
        "codes_positions": float(len(codes)),
        "codes_labelled_positions": float((concept >= 0).sum()),
    }
    metrics |= label_metrics(codes, concept, "concept") | label_metrics(codes, group, "group")
    for i, m in enumerate(found.modalities):
        own = modality == i
        metrics[f"codes_used_{m}"] = float(len(np.unique(codes[own])))
        metrics |= label_metrics(codes[own], concept[own], "concept", f"_{m}")
    agreement = concept_agreement(codes, modality, concept)
    if agreement is not None:
        metrics["codes_concept_agreement"] = agreement
    return metrics


def code_table(
    model: CodeBridgeModel, samples: list[Sample], found: Assignments, patches: TopPatches | None, words: int = 5
) -> list[dict[str, Any]]:
    """One entry per used code, most used first: counts per modality, top words, top concepts, top patches."""
    codes, modality, concept, token = found.arrays()
    usage = np.bincount(codes, minlength=found.num_codes)
    names = concept_names(samples)
    word_tokens = (token >= 0) & ~np.isin(token, SPECIAL_IDS)
    table = []
    for k in np.flatnonzero(usage)[np.argsort(-usage[usage > 0], kind="stable")]:
        own = codes == k
        top_concepts = Counter(concept[own & (concept >= 0)].tolist()).most_common(words)
        entry: dict[str, Any] = {
            "code": int(k),
            "count": int(usage[k]),
            "count_by_modality": {m: int((own & (modality == i)).sum()) for i, m in enumerate(found.modalities)},
            "top_words": [
                [model.tokenizer.token(t), n] for t, n in Counter(token[own & word_tokens].tolist()).most_common(words)
            ],
            "top_concepts": [[names.get(c, str(c)), n] for c, n in top_concepts],
        }
        if patches is not None:
            entry["top_patches"] = patches.entries(int(k), samples)
        table.append(entry)
    return table


def evaluate_codes(
    model: CodeBridgeModel,
    samples: list[Sample],
    out_dir: str | Path | None = None,
    *,
    groups: Mapping[int, int] | None = None,
    batch_size: int = 64,
    top: int = 8,
    rows: int = 12,
) -> dict[str, float]:
    """Flat ``codes_*`` metrics (module docstring). With ``out_dir`` also ``codes.json`` (``usage``: the histogram
    over all K codes; ``codes``: per used code its usage by modality, top words, top concepts, top patches with
    their image and grid position) and ``codes_grid.png`` (top patches of ``rows`` codes, see ``grid_rows``).

    ``groups`` maps concept -> group (default: from the samples' labels). Scene objects carry only a concept, so
    for the built-in scenes pass their source's ``concept_groups()``.
    """
    discrete_space(model)  # a clear error for a bridge without codes, before any data is encoded
    modalities = [m for m in model.modalities if samples and all(s.has(m) for s in samples)]
    if not modalities:
        raise ConfigError(f"no modality of the model ({', '.join(model.modalities)}) is in every sample")
    with inference(model):
        found, patches = collect(model, samples, modalities, batch_size, top)
    metrics = code_metrics(found, concept_groups(samples) if groups is None else groups)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        table = code_table(model, samples, found, patches)
        usage = np.bincount(found.arrays()[0], minlength=found.num_codes)
        atomic_write_json(out_dir / CODES_FILE, {"usage": usage.tolist(), "codes": table}, indent=1)
        if patches is not None:
            draw_code_grid(model, samples, grid_rows(table, rows), patches.grid, out_dir / GRID_FILE)
    return metrics


# ------------------------------------------------------------------------------------------------ figure
def patch_crop(image: Image.Image, grid: int, row: int, col: int, context: int = 1, size: int = 64) -> Image.Image:
    """A square window of ``2 * context + 1`` patches holding the patch (shifted inward at the image border),
    resized to ``size`` px, with the patch outlined in red."""
    boxes = patch_boxes(image.size, grid).view(grid, grid, 4)
    span = min(2 * context + 1, grid)
    r0, c0 = (min(max(i - context, 0), grid - span) for i in (row, col))
    x0, y0 = boxes[r0, c0, :2].tolist()
    x1, y1 = boxes[r0 + span - 1, c0 + span - 1, 2:].tolist()
    crop = image.crop((round(x0), round(y0), round(x1), round(y1))).resize((size, size), Image.Resampling.NEAREST)
    px0, py0, px1, py1 = boxes[row, col].tolist()
    scale = size / (x1 - x0)
    ImageDraw.Draw(crop).rectangle(
        ((px0 - x0) * scale, (py0 - y0) * scale, (px1 - x0) * scale - 1, (py1 - y0) * scale - 1), outline=(255, 0, 0)
    )
    return crop


def grid_rows(table: list[dict[str, Any]], rows: int) -> list[dict[str, Any]]:
    """The codes to draw: those used by two or more modalities first (the shared ones the claim is about), each
    group most used first; only codes with image patches."""
    drawable = [entry for entry in table if entry.get("top_patches")]
    shared = [entry for entry in drawable if sum(n > 0 for n in entry["count_by_modality"].values()) >= 2]
    return (shared + [entry for entry in drawable if entry not in shared])[:rows]


def draw_code_grid(
    model: CodeBridgeModel, samples: list[Sample], table: list[dict[str, Any]], grid: int, path: Path
) -> Path:
    """A row per code: its top patches (in their image context), titled with the code's usage and top words."""
    if not table:
        raise ValueError("no code has image patches to draw")
    columns = max(len(entry["top_patches"]) for entry in table)
    fig = Figure(figsize=(1.1 * columns, 1.35 * len(table)))
    axes = fig.subplots(len(table), columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, entry in zip(axes, table, strict=True):
        words = ", ".join(word.strip() for word, _ in entry["top_words"][:3]) or "(no words)"
        row[0].set_title(f"code {entry['code']} (n={entry['count']}): {words}", fontsize=8, loc="left")
        for ax, patch in zip(row, entry["top_patches"], strict=False):
            image = model.preprocessors["image"].load(samples[patch["index"]].media["image"])
            ax.imshow(patch_crop(image, grid, patch["row"], patch["col"]))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
