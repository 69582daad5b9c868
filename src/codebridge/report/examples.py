"""Example queries: a few queries of the validation data with their top-k gallery items, the correct ones marked.

Items are the distinct captions and media of the evaluation (``eval.embed.embed_items``), so the ranks shown are
the ones ``codebridge eval --task retrieval`` counts (several correct items per query, ties in the query's favour).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from codebridge.data.dataset import decode
from codebridge.data.modalities import modality
from codebridge.data.sample import Sample
from codebridge.eval.embed import embed_items, matching_pairs
from codebridge.eval.retrieval import retrieval_ranks

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel


@dataclass
class Hit:
    item: int  # gallery item index
    score: float
    correct: bool
    thumbnail: Image.Image


@dataclass
class Example:
    query: str  # the caption, or what a spoken query says
    hits: list[Hit]
    rank: int  # rank of the best correct gallery item (1 = first)


@dataclass
class Examples:
    query_modality: str
    gallery_modality: str
    n_gallery: int
    examples: list[Example]


def pick_modalities(
    model: CodeBridgeModel, model_modalities: Sequence[str], samples: list[Sample]
) -> tuple[str, str] | None:
    """(query, gallery) modalities that the model has and every sample has, or None when there is no such pair:
    the gallery is the first whose items show as thumbnails, the query text if present, else the first other one."""
    present = [m for m in model_modalities if samples and all(s.has(m) for s in samples)]
    gallery = next((m for m in present if thumbnail(model, m, samples[0]) is not None), None)
    others = [m for m in present if m != gallery]
    query = "text" if "text" in others else next(iter(others), None)
    return (query, gallery) if query and gallery else None


def spread(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n)`` (all of them when n <= count): a fixed, varied choice."""
    return sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))


def top_hits(scores: torch.Tensor, correct: set[int], k: int) -> list[tuple[int, float, bool]]:
    """(gallery item, score, correct) of the ``k`` best-scoring items of one query, best first."""
    values, items = scores.topk(min(k, len(scores)))
    return [(int(i), float(v), int(i) in correct) for v, i in zip(values.tolist(), items.tolist(), strict=True)]


def owners(rows: list[list[int]], n_items: int) -> list[int]:
    """The first sample holding each item."""
    owner = [-1] * n_items
    for sample, items in enumerate(rows):
        for item in items:
            if owner[item] < 0:
                owner[item] = sample
    return owner


def thumbnail(model: CodeBridgeModel, name: str, sample: Sample) -> Image.Image | None:
    """How the modality shows the sample's item (decoded like the model decodes it), or None."""
    return modality(name).thumbnail(decode(model.preprocessors, sample, name))


def query_text(modality: str, sample: Sample, item_key: str | None) -> str:
    if modality == "text":
        return item_key or ""
    said = sample.media["text"][0] if sample.has("text") else sample.key
    return f"{modality}: {said}"


def example_queries(
    model: CodeBridgeModel, samples: list[Sample], count: int = 4, k: int = 5, batch_size: int = 256
) -> Examples | None:
    """``count`` queries spread over the distinct query items, each with its top-``k`` gallery items."""
    modalities = pick_modalities(model, model.modalities, samples)
    if modalities is None:
        return None
    query_m, gallery_m = modalities
    queries = embed_items(model, samples, query_m, batch_size)
    gallery = embed_items(model, samples, gallery_m, batch_size)
    pairs = matching_pairs(queries, gallery)
    chosen = spread(len(queries.embeddings), count)
    correct = {q: {int(g) for q_, g in pairs.tolist() if q_ == q} for q in chosen}
    subset = torch.tensor([(row, g) for row, q in enumerate(chosen) for g in sorted(correct[q])], dtype=torch.long)
    ranks = retrieval_ranks(queries.embeddings[chosen], gallery.embeddings, subset)
    scores = model.similarity(queries.embeddings[chosen], gallery.embeddings).float().cpu()
    query_owner = owners(queries.rows, len(queries.embeddings))
    gallery_owner = owners(gallery.rows, len(gallery.embeddings))
    captions = _captions(samples) if query_m == "text" else {}
    examples = []
    for row, q in enumerate(chosen):
        hits = [
            Hit(item, score, ok, thumbnail(model, gallery_m, samples[gallery_owner[item]]))
            for item, score, ok in top_hits(scores[row], correct[q], k)
        ]
        text = query_text(query_m, samples[query_owner[q]], captions.get(q))
        examples.append(Example(text, hits, int(ranks[row])))
    return Examples(query_m, gallery_m, len(gallery.embeddings), examples)


def _captions(samples: list[Sample]) -> dict[int, str]:
    """Caption text of each text item: ``embed_items`` numbers the distinct captions in order of appearance."""
    seen: dict[str, int] = {}
    for sample in samples:
        for text in sample.media.get("text", []):
            seen.setdefault(text, len(seen))
    return {item: text for text, item in seen.items()}
