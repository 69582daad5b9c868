"""(e) Retrieval evaluation at scale: ``bidirectional_retrieval`` over N x N random normalised embeddings.

The texts are noisy copies of the images, ``normalise(image + 4 * noise)`` (cosine about 0.24 with their image,
about as high as the best of 100,000 random items in 512 dimensions), so the ranks are neither all 1 nor random
and the metrics can be checked for sense; the cost does not depend on the values. One call is timed while the
allocator's peak is recorded: it runs a few hundred ops of seconds each, so the profiler's per-op cost is lost
in the noise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from codebridge.eval.retrieval import bidirectional_retrieval
from perf_measure import peak_bytes, timed

NOISE = 4.0


def embeddings(items: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    images = torch.randn(items, dim, generator=g)
    texts = images + NOISE * torch.randn(items, dim, generator=g)
    return F.normalize(images, dim=-1).to(device), F.normalize(texts, dim=-1).to(device)


def run_retrieval(items: int, dim: int, chunk_size: int, device: torch.device) -> dict[str, Any]:
    images, texts = embeddings(items, dim, device)
    pairs = torch.arange(items, device=device).repeat(2, 1).T
    metrics: dict[str, float] = {}
    seconds: list[float] = []

    def evaluate() -> None:
        metrics.update(bidirectional_retrieval(images, texts, pairs, chunk_size=chunk_size))

    peak = peak_bytes(lambda: seconds.append(timed(evaluate, device)), device)
    return {
        "items": items,
        "dim": dim,
        "chunk_size": chunk_size,
        "seconds": seconds[0],
        "peak_mb": peak / 2**20,
        "inputs_mb": (images.numel() + texts.numel()) * images.element_size() / 2**20,
        "metrics": metrics,
    }
