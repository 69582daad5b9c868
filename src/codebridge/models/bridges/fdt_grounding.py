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

from codebridge.models.bridges.host_reads import host_reads_free

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


def _score_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of q would run in here: the autocast dtype when autocast is on for q's device."""
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype


class ChunkedMaxPool(torch.autograd.Function):
    """max over t of the masked scores, computed ``chunk`` positions at a time; keeps only the argmax [B, C].

    Forward: one matmul per chunk into a reused [B * chunk, C] buffer, scaled and masked in place (the naive path's
    operations, so the same scores), reduced over the chunk and merged in place into the running max and argmax.
    Ties go to the first position, as in ``Tensor.max(dim)``.
    Backward: the gradient of a max reaches only its argmax, and is zero wherever the pooled gradient is (outside
    the sparsemax support) or the argmax is a padded position (a constant score). On the CPU (``host_reads_free``)
    the scattered gradient is a sparse [B*T, C] matrix with at most B*C entries, and two sparse-dense products give
    grad q and grad tokens: 2*nnz*d multiply-adds instead of the naive 4*B*T*C*d; samples go in groups spanning no
    more (sample, position) rows than a forward chunk (B*chunk). Finding the entries (``nonzero``) would stall an
    accelerator's host and break a compiled graph, so there the scattered gradient is built densely, ``chunk``
    positions at a time, and multiplied like the forward (``_dense_backward``): fixed shapes, no sync. Both passes
    need O(B*chunk*C) memory either way; the token table's gradient is a dense [C, d] tensor in both.
    """

    @staticmethod
    def forward(ctx, q, tokens, mask, scale: float, pad_mode: PadMode, chunk: int):  # type: ignore[override]
        batch, length, dim = q.shape
        dtype = _score_dtype(q)
        qc, tc = q.to(dtype), tokens.to(dtype).T
        buffer = qc.new_empty(batch * min(chunk, length), tokens.shape[0])
        best, value = qc.new_empty(batch, tokens.shape[0]), qc.new_empty(batch, tokens.shape[0])
        idx, where = (torch.empty(batch, tokens.shape[0], dtype=torch.long, device=q.device) for _ in range(2))
        better = torch.empty(batch, tokens.shape[0], dtype=torch.bool, device=q.device)
        fill = float("-inf") if pad_mode == "neg_inf" else 0.0
        # positions padded in some sample, to skip masking the others (a host read: CPU only; elsewhere mask all)
        padded = (~mask).any(0).tolist() if host_reads_free(mask) else [True] * length
        with torch.autocast(q.device.type, enabled=False):  # dtype is chosen above; out= needs exact dtypes
            for start in range(0, length, chunk):
                size = min(chunk, length - start)
                flat = qc[:, start : start + size].reshape(batch * size, dim)
                s = torch.mm(flat, tc, out=buffer[: batch * size]).view(batch, size, -1).mul_(scale)
                if any(padded[start : start + size]):
                    s.masked_fill_(~mask[:, start : start + size].unsqueeze(-1), fill)
                if start == 0:
                    torch.max(s, dim=1, out=(best, idx))
                    continue
                torch.max(s, dim=1, out=(value, where))
                torch.gt(value, best, out=better)  # strict: an equal later value keeps the earlier (first) argmax
                torch.where(better, where.add_(start), idx, out=idx)
                torch.maximum(best, value, out=best)
        ctx.save_for_backward(q, tokens, mask, idx)
        ctx.scale, ctx.chunk = scale, chunk
        return best

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, tokens, mask, idx = ctx.saved_tensors
        work = torch.promote_types(
            torch.promote_types(q.dtype, tokens.dtype), torch.promote_types(grad.dtype, torch.float32)
        )
        qw, tw = q.to(work), tokens.to(work)
        grad_q = torch.empty_like(qw) if ctx.needs_input_grad[0] else None
        grad_t = torch.zeros_like(tw) if ctx.needs_input_grad[1] else None
        live = (grad != 0) & mask.gather(1, idx)
        scattered = _sparse_backward if host_reads_free(grad) else _dense_backward
        scattered(grad.to(work) * ctx.scale, live, qw, tw, idx, ctx.chunk, grad_q, grad_t)
        return (
            None if grad_q is None else grad_q.to(q.dtype),
            None if grad_t is None else grad_t.to(tokens.dtype),
            None,
            None,
            None,
            None,
        )


_Out = torch.Tensor | None


def _sparse_backward(
    g: torch.Tensor,
    live: torch.Tensor,
    qw: torch.Tensor,
    tw: torch.Tensor,
    idx: torch.Tensor,
    chunk: int,
    grad_q: _Out,
    grad_t: _Out,
) -> None:
    """Fills grad q and grad tokens from the sparse scattered gradient: ``g`` [B, C] (pooled gradient times the
    scale) at (b, idx[b, c], c) where ``live`` (CPU: ``nonzero`` reads the host)."""
    batch, length, dim = qw.shape
    group = max(1, batch * chunk // length)  # rows per group <= rows per forward chunk
    for first in range(0, batch, group):
        size = min(group, batch - first)
        local, c = live[first : first + size].nonzero(as_tuple=True)
        b = local + first
        rows = local * length + idx[b, c]
        sparse = torch.sparse_coo_tensor(
            torch.stack([rows, c]), g[b, c], (size * length, tw.shape[0]), check_invariants=False
        )
        if grad_q is not None:  # written in place: no zero-filled [rows, d] temporaries per group
            torch.mm(sparse, tw, out=grad_q[first : first + size].view(size * length, dim))
        if grad_t is not None:
            grad_t.addmm_(sparse.t(), qw[first : first + size].reshape(size * length, dim))


def _dense_backward(
    g: torch.Tensor,
    live: torch.Tensor,
    qw: torch.Tensor,
    tw: torch.Tensor,
    idx: torch.Tensor,
    chunk: int,
    grad_q: _Out,
    grad_t: _Out,
) -> None:
    """``_sparse_backward``'s result from the scattered gradient built densely, ``chunk`` positions at a time:
    position t of sample b gets ``g[b, c]`` for every live token c whose argmax is t (fixed shapes, no host read)."""
    batch, length, dim = qw.shape
    g = torch.where(live, g, 0.0).unsqueeze(1)  # [B, 1, C]
    for start in range(0, length, chunk):
        size = min(chunk, length - start)
        positions = torch.arange(start, start + size, device=idx.device).view(1, size, 1)
        scattered = torch.where(idx.unsqueeze(1) == positions, g, 0.0)  # [B, size, C]
        if grad_q is not None:
            grad_q[:, start : start + size] = scattered @ tw
        if grad_t is not None:
            flat = scattered.reshape(batch * size, -1)
            grad_t.addmm_(flat.T, qw[:, start : start + size].reshape(batch * size, dim))


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
