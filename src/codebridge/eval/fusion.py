"""Fused retrieval for the discrete bridges: ``score = continuous + w * discrete`` with w chosen on validation data.

CMCM (papers.md A1) says the discrete codes *complement* the continuous summary. The bridge gives both parts
(``Bridge.retrieval_parts``: the codebook's normalised summary and discrete summary; FDT's embedding and its
normalised token weights). The weight w is swept over ``FUSION_GRID`` on a validation spec and the w with the best
mean R@1 (over both directions of every modality pair; ties: the smaller w) is applied, unchanged, to the evaluated
spec: the test data never takes part in the choice.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from codebridge.eval.embed import Items, PartItems, matching_pairs
from codebridge.eval.retrieval import bidirectional_retrieval

FUSION_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)

Metrics = dict[str, float]


def fused_embeddings(parts: PartItems, weight: float) -> Tensor:
    """``concat(continuous, sqrt(w) discrete)``: the dot product of two of them is ``S_cont + w S_disc``."""
    return torch.cat([parts.continuous, math.sqrt(weight) * parts.discrete.to(parts.continuous.dtype)], dim=1)


def fused_metrics(parts: dict[str, PartItems], weight: float, chunk_size: int = 4096) -> Metrics:
    """Retrieval metrics (both directions of every modality pair, in the given order) with fused scores."""
    metrics: Metrics = {}
    for a, b in itertools.combinations(parts, 2):
        pairs = matching_pairs(Items(parts[a].continuous, parts[a].rows), Items(parts[b].continuous, parts[b].rows))
        emb_a, emb_b = fused_embeddings(parts[a], weight), fused_embeddings(parts[b], weight)
        metrics |= bidirectional_retrieval(emb_a, emb_b, pairs, (a, b), chunk_size)
    return metrics


def mean_recall_at_1(metrics: Metrics) -> float:
    """The selection criterion: the mean of every ``*_R@1``."""
    values = [v for k, v in metrics.items() if k.endswith("_R@1")]
    return sum(values) / len(values)


def choose_weight(
    val: dict[str, PartItems], grid: tuple[float, ...] = FUSION_GRID, chunk_size: int = 4096
) -> tuple[float, Metrics]:
    """(the w of ``grid`` with the best validation mean R@1, the first on ties; the sweep as
    ``fusion_val_mean_R@1@{w}``)."""
    sweep = {w: mean_recall_at_1(fused_metrics(val, w, chunk_size)) for w in grid}
    best = max(grid, key=lambda w: (sweep[w], -grid.index(w)))
    return best, {f"fusion_val_mean_R@1@{w:g}": score for w, score in sweep.items()}


def fused_retrieval(
    val: dict[str, PartItems],
    test: dict[str, PartItems],
    grid: tuple[float, ...] = FUSION_GRID,
    chunk_size: int = 4096,
) -> Metrics:
    """w chosen on ``val`` only, then applied to ``test``: ``fusion_weight``, ``fusion_val_mean_R@1`` (at that w),
    the validation sweep, and the test metrics prefixed ``fused_``."""
    weight, sweep = choose_weight(val, grid, chunk_size)
    test_metrics = fused_metrics(test, weight, chunk_size)
    return {
        "fusion_weight": weight,
        "fusion_val_mean_R@1": sweep[f"fusion_val_mean_R@1@{weight:g}"],
        **sweep,
        **{f"fused_{k}": v for k, v in test_metrics.items()},
    }
