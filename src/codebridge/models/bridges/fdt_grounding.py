"""FDT grounding: how strongly each input attends to each shared token, pooled over its fine-grained vectors.

``s[b, t, c] = q[b, t] . tokens[c] / sqrt(d) / T`` with padded positions masked, pooled over t into [B, C].
The naive path builds the full [B, T, C] tensor (B=128, T=77, C=16384: 161M floats) several times over: the
product, its scaled and masked copies, and in backward the scattered max gradient and its masked copy. The lean
path never does: max-pooling runs over chunks of tokens and carries only the running max and argmax [B, C] to
backward (the gradient of a max reaches only its argmax), so peak extra memory is O(B * chunk * C); mean/sum
pooling is linear in q, so it pools q first and needs only [B, C].

Pad handling (``pad_mode``): "neg_inf" excludes padded positions from the pool (the fix); "zero" reproduces the
authors' ``s * (pad == 0)``: a padded position scores exactly 0 and takes part in the pool, so a max-pooled
score is never below 0 for a padded input, and the mean divides by all T positions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

PadMode = Literal["neg_inf", "zero"]
Pooling = Literal["max", "mean", "sum"]


def score_scale(dim: int, temperature: float) -> float:
    """The factor 1 / (sqrt(d) T) applied to every dot product."""
    return 1.0 / (math.sqrt(dim) * temperature)


def _mask_scores(s: torch.Tensor, mask: torch.Tensor, pad_mode: PadMode) -> torch.Tensor:
    fill = float("-inf") if pad_mode == "neg_inf" else 0.0
    return s.masked_fill(~mask.unsqueeze(-1), fill)


def token_scores(
    q: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float, pad_mode: PadMode = "neg_inf"
) -> torch.Tensor:
    """The full masked grounding [B, T, C] of queries q [B, T, d] on tokens [C, d] (mask [B, T], True = real)."""
    return _mask_scores(q @ tokens.T * score_scale(tokens.shape[-1], temperature), mask, pad_mode)


def _naive_pool(s: torch.Tensor, mask: torch.Tensor, pooling: Pooling, pad_mode: PadMode) -> torch.Tensor:
    if pooling == "max":
        return s.max(dim=1).values  # gradient to the first argmax, like the chunked path
    s = s.masked_fill(~mask.unsqueeze(-1), 0.0)
    if pooling == "sum":
        return s.sum(1)
    count = mask.sum(1, keepdim=True) if pad_mode == "neg_inf" else mask.shape[1]
    return s.sum(1) / count


def _linear_pool(
    q: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, scale: float, pooling: Pooling, pad_mode: PadMode
) -> torch.Tensor:
    """mean/sum of the scores = score of the mean/sum of the queries: [B, C] without the [B, T, C] tensor."""
    pooled = (q * mask.unsqueeze(-1).to(q.dtype)).sum(1)
    if pooling == "mean":
        pooled = pooled / (mask.sum(1, keepdim=True) if pad_mode == "neg_inf" else mask.shape[1])
    return pooled @ tokens.T * scale


class ChunkedMaxPool(torch.autograd.Function):
    """max over t of the masked scores, computed ``chunk`` tokens at a time; keeps only the argmax [B, C].

    Ties go to the first position, as in ``Tensor.max(dim)``. Backward scatters the pooled gradient onto the
    argmax positions chunk by chunk, so peak memory is O(B * chunk * C) in both passes.
    """

    @staticmethod
    def forward(ctx, q, tokens, mask, scale: float, pad_mode: PadMode, chunk: int):  # type: ignore[override]
        best = idx = None
        for start in range(0, q.shape[1], chunk):
            s = _mask_scores(q[:, start : start + chunk] @ tokens.T * scale, mask[:, start : start + chunk], pad_mode)
            value, where = s.max(dim=1)
            if best is None:
                best, idx = value, where
            else:
                better = value > best  # strict: an equal later value keeps the earlier (first) argmax
                best = torch.where(better, value, best)
                idx = torch.where(better, where + start, idx)
        ctx.save_for_backward(q, tokens, mask, idx)
        ctx.scale, ctx.chunk = scale, chunk
        return best

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, tokens, mask, idx = ctx.saved_tensors
        work = torch.promote_types(torch.promote_types(q.dtype, tokens.dtype), grad.dtype)
        qw, tw, grad = q.to(work), tokens.to(work), grad.to(work) * ctx.scale
        grad_q = torch.zeros_like(qw) if ctx.needs_input_grad[0] else None
        grad_t = torch.zeros_like(tw) if ctx.needs_input_grad[1] else None
        batch, length = q.shape[:2]
        for start in range(0, length, ctx.chunk):
            size = min(ctx.chunk, length - start)
            local = idx - start
            inside = (local >= 0) & (local < size)
            # g[b, t, c] = grad[b, c] where t is the argmax of (b, c); each (b, c) writes one cell of its column
            g = torch.zeros(batch, size, tw.shape[0], dtype=work, device=q.device)
            g.scatter_(1, local.clamp(0, size - 1).unsqueeze(1), (grad * inside).unsqueeze(1))
            g = g * mask[:, start : start + size].unsqueeze(-1)  # a padded position scores a constant: no gradient
            if grad_q is not None:
                grad_q[:, start : start + size] = g @ tw
            if grad_t is not None:
                grad_t += g.flatten(0, 1).T @ qw[:, start : start + size].flatten(0, 1)
        return (
            None if grad_q is None else grad_q.to(q.dtype),
            None if grad_t is None else grad_t.to(tokens.dtype),
            None,
            None,
            None,
            None,
        )


def pooled_scores(
    q: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    pooling: Pooling = "max",
    pad_mode: PadMode = "neg_inf",
    chunk_size: int = 0,
) -> torch.Tensor:
    """Grounding pooled over tokens: [B, C]. ``chunk_size`` 0 builds the full [B, T, C]; >0 takes the lean path."""
    if chunk_size < 0:
        raise ValueError(f"pooled_scores: chunk_size must be >= 0 (0 = naive), got {chunk_size}")
    if chunk_size == 0:
        return _naive_pool(token_scores(q, tokens, mask, temperature, pad_mode), mask, pooling, pad_mode)
    scale = score_scale(tokens.shape[-1], temperature)
    if pooling == "max":
        dtype = torch.promote_types(q.dtype, tokens.dtype)
        return ChunkedMaxPool.apply(q.to(dtype), tokens.to(dtype), mask, scale, pad_mode, chunk_size)
    return _linear_pool(q, tokens, mask, scale, pooling, pad_mode)
