"""Sparsemax (Martins & Astudillo 2016): the Euclidean projection onto the simplex, exactly sparse.

``sparsemax`` sorts the whole row; ``topk_sparsemax`` only needs the top k values (``torch.topk``) and doubles k
while the k-th value is still in the support, so it stays exact (like entmax's ``k``). Both compute in at least
fp32 (bf16 autocast cannot round the threshold away) and share one autograd Function whose backward is the closed
form ``(g - mean of g over the support) * support`` instead of autograd through sort and cumsum.
The top-k search reads the support size on the host, so ``AdaptiveTopkSparsemax`` uses it only where that read is
free (``host_reads_free``: CPU, eager); on an accelerator and under ``torch.compile`` it sorts (same result, no sync).
"""

from __future__ import annotations

import torch

from codebridge.models.bridges.host_reads import host_reads_free


def _threshold(z: torch.Tensor, k: int | None) -> torch.Tensor:
    """tau [..., 1] over the last dim of ``z`` (already shifted so its max is 0) from the top ``k`` (None: all)."""
    n = z.shape[-1]
    while True:
        exact = k is None or k >= n
        top = torch.sort(z, dim=-1, descending=True).values if exact else torch.topk(z, k, dim=-1).values
        ranks = torch.arange(1, top.shape[-1] + 1, device=z.device, dtype=z.dtype)
        cumsum = top.cumsum(-1)
        in_support = 1 + ranks * top > cumsum  # true exactly for the first |support| sorted values
        if exact or not bool(in_support[..., -1].any()):
            size = (in_support * ranks).amax(-1, keepdim=True)  # k(z) = max{j : 1 + j z_(j) > sum_{i<=j} z_(i)}
            return (cumsum.gather(-1, size.long() - 1) - 1) / size
        k *= 2  # some row's support may reach past the k-th value: look further


class _Sparsemax(torch.autograd.Function):
    """Sparsemax over the last dim; ``k`` selects the top-k threshold search (None: full sort)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, k: int | None) -> torch.Tensor:
        ctx.in_dtype = z.dtype
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        z = z - z.amax(-1, keepdim=True)
        out = (z - _threshold(z, k)).clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        support = (out > 0).to(out.dtype)
        grad = grad.to(out.dtype) * support
        mean = grad.sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
        return (support * (grad - mean)).to(ctx.in_dtype), None


def _apply(z: torch.Tensor, dim: int, k: int | None) -> torch.Tensor:
    if k is not None and k < 1:
        raise ValueError(f"topk_sparsemax: k must be >= 1, got {k}")
    return _Sparsemax.apply(z.movedim(dim, -1), k).movedim(-1, dim)


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sort-based sparsemax along ``dim``; the output has dtype promote(z.dtype, float32)."""
    return _apply(z, dim, None)


def topk_sparsemax(z: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Exact sparsemax along ``dim`` from a partial top-k (k doubles until the support fits)."""
    return _apply(z, dim, k)


def capped_sparsemax(z: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Sparsemax of each row's ``k`` largest values, 0 elsewhere: at most ``k`` non-zeros whatever the scores.

    Equal to ``sparsemax`` wherever its support has at most ``k`` entries. Beyond that it is a different map (the
    projection of the top k onto the simplex), which is the point: a hard cap on the support, where a temperature
    only sets it indirectly. The gradient reaches the top k only. Fixed shapes: no host read, compiles cleanly.
    """
    if k < 1:
        raise ValueError(f"capped_sparsemax: k must be >= 1, got {k}")
    z = z.movedim(dim, -1)
    if k >= z.shape[-1]:
        return sparsemax(z).movedim(-1, dim)
    top = torch.topk(z, k, dim=-1)
    weights = sparsemax(top.values)
    out = torch.zeros(z.shape, dtype=weights.dtype, device=z.device).scatter(-1, top.indices, weights)
    return out.movedim(-1, dim)


class AdaptiveTopkSparsemax:
    """Top-k sparsemax over the last dim whose k follows the support seen in the previous call.

    k is set to twice the largest support of the last call (at least ``min_k``), so a support that grows
    by less than 2x between calls costs no retry, and one that shrinks makes the next top-k cheaper.
    k is a speed hint only (results are exact for every k), so it is not saved with the model.
    Where reading the support size would stall the host or break a compiled graph (``host_reads_free`` false), the
    full-sort ``sparsemax`` runs instead: the same exact result, with fixed shapes.
    """

    def __init__(self, min_k: int = 64) -> None:
        if min_k < 1:
            raise ValueError(f"AdaptiveTopkSparsemax: min_k must be >= 1, got {min_k}")
        self.min_k = min_k
        self.k = min_k

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if not host_reads_free(z):
            return sparsemax(z)
        out = topk_sparsemax(z, self.k)
        support = int((out > 0).sum(-1).max()) if out.numel() else 0
        self.k = max(self.min_k, 2 * support)
        return out
