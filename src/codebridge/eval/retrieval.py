"""Cross-modal retrieval metrics with OpenCLIP's names, computed in chunks of queries.

A query may have several correct gallery items (COCO: an image and its five captions). Its rank is the 1-based
rank of its best-scoring correct item: ``1 + (number of wrong gallery items scoring at least as high)``. Ties with
wrong items therefore count against the query: a collapsed model whose embeddings are all equal (sparse FDT features
can tie exactly) ranks last, never first. The result never depends on the order of the gallery. Only ``[chunk, Ng]``
scores exist at any time, so 100,000 x 100,000 retrieval fits in memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KS = (1, 5, 10)
MAX_GALLERY = 2**24  # ranks are counted in float32, exact below this


def caption_pairs(item_index: Tensor) -> Tensor:
    """(item, caption) pairs for captions whose owning item is ``item_index[caption]``: the COCO layout."""
    return torch.stack([item_index.long(), torch.arange(len(item_index), device=item_index.device)], dim=1)


def _check(query: Tensor, gallery: Tensor, positives: Tensor) -> None:
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query and gallery must be [N, E] with the same E; got {list(query.shape)} and {list(gallery.shape)}"
        )
    if positives.ndim != 2 or positives.shape[1] != 2:
        raise ValueError(f"positives must be [P, 2] (query row, gallery row) pairs; got {list(positives.shape)}")
    for name, column, size in (("query", positives[:, 0], len(query)), ("gallery", positives[:, 1], len(gallery))):
        if len(column) and (column.min() < 0 or column.max() >= size):
            raise ValueError(f"positives name {name} rows outside 0..{size - 1}")
    for name, emb in (("query", query), ("gallery", gallery)):
        if not torch.isfinite(emb).all():
            raise ValueError(f"{name} embeddings contain NaN or inf; the model diverged or an input is broken")


def retrieval_ranks(query: Tensor, gallery: Tensor, positives: Tensor, chunk_size: int = 4096) -> Tensor:
    """1-based rank of each query's best positive, ``[Nq]`` long; scores are float32 dot products.

    ``positives``: ``[P, 2]`` long pairs (query row, gallery row); every query needs at least one.
    Peak extra memory is one float32 score chunk, ``4 * chunk_size * Ng`` bytes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(gallery) >= MAX_GALLERY:
        raise ValueError(f"a gallery of {len(gallery)} items is too large; at most {MAX_GALLERY - 1} are supported")
    positives = positives.to(device=query.device, dtype=torch.long)
    _check(query, gallery, positives)
    order = torch.argsort(positives[:, 0], stable=True)
    pos_query, pos_gallery = positives[order, 0], positives[order, 1]
    counts = torch.bincount(pos_query, minlength=len(query))
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{int((counts == 0).sum())} queries have no correct gallery item (first rows: {missing})")
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
    gallery = gallery.float()
    ranks = torch.empty(len(query), dtype=torch.long, device=query.device)
    for start in range(0, len(query), chunk_size):
        end = min(start + chunk_size, len(query))
        scores = query[start:end].float() @ gallery.T  # [chunk, Ng]
        rows = pos_query[offsets[start] : offsets[end]] - start
        positive_scores = scores[rows, pos_gallery[offsets[start] : offsets[end]]]
        best = scores.new_full((end - start,), -math.inf).scatter_reduce(0, rows, positive_scores, reduce="amax")
        tied_positives = torch.zeros_like(best).scatter_add_(0, rows, (positive_scores >= best[rows]).float())
        # in place, so the chunk is the only [chunk, Ng] buffer; a float32 count is exact below 2**24
        at_least_best = scores.ge_(best[:, None]).sum(dim=1)
        ranks[start:end] = (1 + at_least_best - tied_positives).long()
        del scores  # free this chunk before the next matmul allocates its own
    return ranks


def median_rank(ranks: Tensor) -> float:
    """OpenCLIP's median rank: the floor of the median (the mean of the two middle ranks when N is even)."""
    ordered = ranks.sort().values
    n = len(ordered)
    middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) // 2
    return float(middle)


def rank_metrics(ranks: Tensor, prefix: str, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``{prefix}_R@k`` (fraction of queries with rank <= k), ``{prefix}_median_rank``, ``{prefix}_mean_rank``."""
    if len(ranks) == 0:
        raise ValueError(f"{prefix}: no queries to rank")
    metrics = {f"{prefix}_R@{k}": (ranks <= k).double().mean().item() for k in ks}
    metrics[f"{prefix}_median_rank"] = median_rank(ranks)
    metrics[f"{prefix}_mean_rank"] = ranks.double().mean().item()
    return metrics


def retrieval_metrics(
    query: Tensor, gallery: Tensor, positives: Tensor, chunk_size: int = 4096, prefix: str = "text_to_image"
) -> dict[str, float]:
    """Recall@1/5/10, median and mean rank of retrieving ``gallery`` rows for each ``query`` row, plus sizes."""
    ranks = retrieval_ranks(query, gallery, positives, chunk_size)
    return {
        **rank_metrics(ranks, prefix),
        f"{prefix}_n_queries": len(query),
        f"{prefix}_n_gallery": len(gallery),
    }


def bidirectional_retrieval(
    emb_a: Tensor, emb_b: Tensor, pairs: Tensor, names: tuple[str, str] = ("image", "text"), chunk_size: int = 4096
) -> dict[str, float]:
    """Both directions between two modalities; ``pairs`` ``[P, 2]`` are matching (row of a, row of b)."""
    a, b = names
    return {
        **retrieval_metrics(emb_a, emb_b, pairs, chunk_size, prefix=f"{a}_to_{b}"),
        **retrieval_metrics(emb_b, emb_a, pairs.flip(1), chunk_size, prefix=f"{b}_to_{a}"),
    }
