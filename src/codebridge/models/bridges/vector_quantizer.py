"""One EMA vector-quantisation codebook shared by several named inputs (modalities), with its losses returned.

Why not vector-quantize-pytorch (docs/ecosystem.md asks to decide): CMCM needs the differentiable distance of
every position to every code, a shared codebook must be updated once from all modalities together (or with CMG's
mixed MM-EMA), and padding, per-modality usage and rank-synchronised restarts must all honour masks. These cut
across ``VectorQuantize``'s one-input forward, so a focused module is simpler than wrapping it.

Conventions (papers.md A2.2 and CMG's ``Cross_VQEmbeddingEMA``):
- the codebook ``embed`` [K, D] is a buffer (no gradient), initialised U(-1/K, 1/K);
- EMA: ``N <- decay N + (1 - decay) counts``, Laplace smoothing ``N <- (N + eps) / (sum N + K eps) * sum N``
  (stored smoothed, as CMG does), ``W <- decay W + (1 - decay) sums``, ``E <- W / N``;
- statistics are summed over ranks before the update, so every rank keeps the same codebook;
- padding positions (mask False) never enter statistics, losses or usage counters.
All collectives and usage counters run in training mode only, so evaluation may run on a single rank and never
shows up in the training log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from codebridge.distributed import is_distributed, world_size

# Squared distances below this are raised to it before sqrt: sqrt'(0) is infinite, and a restarted code can equal
# an encoder vector exactly.
SQRT_FLOOR = 1e-12
NORM_FLOOR = 1e-12  # the rotation trick divides by vector norms; a padded (zero) position must not give inf
FSQ_EPS = 1e-3  # FSQ's bound keeps tanh a little inside the outermost levels (Mentzer et al. 2023)
Estimator = Literal["ste", "rotation"]


@dataclass
class Quantized:
    """What the codebook returns for one input.

    quantized:  [B, T, D] straight-through output ``x + sg(e - x)`` (value e, gradient identity); 0 at padding
    codes:      [B, T] long, index of the nearest code, -1 at padding
    distances:  [B, T, K] L2 distances (not squared) to every code, with gradient to x only (for CMCM)
    commitment: scalar, ``commitment_weight * ||x - sg(e)||^2`` averaged over valid positions and dimensions
    codebook_loss: scalar, ``||sg(x) - e||^2`` averaged the same way when the codes are trained by gradient
        (SimVQ); 0 otherwise
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    distances: torch.Tensor
    commitment: torch.Tensor
    codebook_loss: torch.Tensor


def squared_distances(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """``|x|^2 - 2 x E^T + |E|^2`` for x [N, D] and E [K, D] with one matmul, clamped at 0 (rounding can go below)."""
    d2 = torch.addmm((embed * embed).sum(-1), x, embed.T, alpha=-2.0) + (x * x).sum(-1, keepdim=True)
    return d2.clamp_min(0.0)


def straight_through(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Value e, gradient identity to x (van den Oord et al. 2017): ``x + sg(e - x)``."""
    return x + (e - x).detach()


def rotation_trick(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Value e, gradient ``lambda R^T g`` to x (Fifty et al. 2024, "Restructuring vector quantization with the
    rotation trick"): R rotates x/|x| onto e/|e| in the plane they span, ``R = I - 2 r r^T + 2 u_e u_x^T`` with
    ``r = normalize(u_x + u_e)``, and ``lambda = |e| / |x|``; R and lambda are constants (no gradient to e).
    Unlike the straight-through estimator, the gradient keeps the angle and relative norm between x and its code,
    so vectors assigned to one code get different updates. Computed as ``lambda (x - 2 r (r.x) + 2 u_e (u_x.x))``
    without building R."""
    x_norm = x.detach().norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    e = e.detach()
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    u_x, u_e = x.detach() / x_norm, e / e_norm
    r = F.normalize(u_x + u_e, dim=-1, eps=NORM_FLOOR)
    rotated = x - 2 * r * (r * x).sum(-1, keepdim=True) + 2 * u_e * (u_x * x).sum(-1, keepdim=True)
    return (e_norm / x_norm) * rotated


ESTIMATORS = {"ste": straight_through, "rotation": rotation_trick}


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code histogram ``counts`` [K]: the effective number of codes in use (0 if empty)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    return torch.exp(-torch.special.xlogy(p, p).sum()).item()


def _sum_over_ranks_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def _from_rank0_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


class EMAVectorQuantizer(nn.Module):
    """Nearest-code quantiser with an EMA-updated codebook shared by every input of ``forward``.

    The base of ``SimVectorQuantizer`` and ``FiniteScalarQuantizer``, which change only how the codes are held and
    updated (``_init_codes``, ``code_vectors``, ``_update``, ``_set_codes``) and, for FSQ, how inputs are bounded
    and assigned (``_prepare``, ``_assign``).

    Args:
        num_codes, dim: codebook size K and code dimension D.
        decay, eps: EMA decay gamma and Laplace-smoothing epsilon (0.99, 1e-5 as in CMG).
        commitment_weight: beta of the commitment loss (0.25).
        dead_code_threshold: a code unused (by every input, on every rank) for this many consecutive training
            batches is restarted at a random encoder vector of the current batch, chosen on rank 0; 0: never.
        kmeans_init: initialise the codebook by k-means (``kmeans_iters`` Lloyd steps) on the first training batch.
        mm_ema: CMG extension. Update once per input, in order, with the mixed target ``0.5 x_X + 0.5 / (M-1)
            sum_Y x_Y`` at X's code (0.5/0.5 bimodal, 0.5/0.25/0.25 tri-modal); needs position-aligned inputs.
        cross_commitment: CMG extension (as coded). ``2 beta ||x_X - sg(e_X)||^2 + beta / (M-1) sum_Y ||x_X -
            sg(e_Y)||^2`` (2β + β bimodal, 2β + 0.5β + 0.5β tri-modal); needs position-aligned inputs.
        estimator: how the gradient passes the quantisation: ``ste`` (straight-through) or ``rotation``
            (``rotation_trick``).
    """

    trained_codes = False  # True: the codes get a gradient (``codebook_loss``) instead of an EMA update

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        dead_code_threshold: int = 300,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        mm_ema: bool = False,
        cross_commitment: bool = False,
        estimator: Estimator = "ste",
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"a codebook needs num_codes >= 1 and dim >= 1, got {num_codes} x {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim = num_codes, dim
        self.decay, self.eps = decay, eps
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.mm_ema, self.cross_commitment = mm_ema, cross_commitment
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
        self.estimate = ESTIMATORS[estimator]
        self._init_codes()
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        # whether ``initted`` must still be read (a host read, once): set again whenever a state dict is loaded
        self._check_init = kmeans_init
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_check_init", True))
        self._usage: dict[str, torch.Tensor] = {}

    def _init_codes(self) -> None:
        embed = torch.empty(self.num_codes, self.dim).uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
        self.register_buffer("embed", embed)
        # N starts at 1 (not CMG's 0) so that E = W / N holds from the start: with N = 0 an unused code becomes
        # decay * E_init / (tiny smoothed N) after the first update and is flung far from the data.
        self.register_buffer("cluster_size", torch.ones(self.num_codes))
        self.register_buffer("embed_sum", embed.clone())

    def code_vectors(self) -> torch.Tensor:
        """[K, D] the codes as ``forward`` uses them (with gradient where they are trained)."""
        return self.embed

    @property
    def code_dtype(self) -> torch.dtype:
        """The precision codes, distances and statistics are computed in (fp32 unless the module was cast)."""
        return self.embed.dtype

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The vector that is quantised, from the input (FSQ bounds it)."""
        return x

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self, inputs: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Quantized]:
        """Quantise every input x [B, T, D] (mask [B, T], True = real) with the same codebook state, then, in
        training mode, update the codebook once from all of them (all ranks together)."""
        masks = self._checked_masks(inputs, masks)
        # garbage-proof padding (after _prepare too: it must not turn a padded 0 into something else)
        xs = {m: self._prepare(x.masked_fill(~masks[m].unsqueeze(-1), 0.0)) for m, x in inputs.items()}
        xs = {m: x.masked_fill(~masks[m].unsqueeze(-1), 0.0) for m, x in xs.items()}
        if self.training and self._check_init:
            if not bool(self.initted):
                self._kmeans_init(torch.cat([x.detach()[masks[m]] for m, x in xs.items()]))
            self._check_init = False
        device = next(iter(xs.values())).device.type
        with torch.autocast(device, enabled=False):
            live = self.code_vectors()
            # A snapshot: the update below changes the codes in place, and autograd keeps this copy for backward.
            embed = live.detach().clone()
            assigned = {m: self._assign(x, embed) for m, x in xs.items()}
        codes = {m: assigned[m][0].masked_fill(~masks[m], -1) for m in xs}
        stats = self._statistics(xs, codes)  # [M, K, 1 + D]: counts, sums of EMA targets
        if self.training:
            _sum_over_ranks_(stats)
        valid = stats[:, :, 0].sum(-1)  # [M] valid positions per input (over ranks in training)
        commitment = self._commitment(xs, {m: a[2] for m, a in assigned.items()}, masks, valid)
        codebook_loss = self._codebook_loss(xs, live, codes, masks, valid)
        if self.training:
            self._update(stats)
            self._restart_dead(stats[:, :, 0].sum(0) > 0, xs, masks)
        if self.training:  # usage describes training batches only (see usage_stats)
            self._count_usage(codes)
        return {
            m: Quantized(
                quantized=self.estimate(x, assigned[m][2].to(x.dtype)).masked_fill(~masks[m].unsqueeze(-1), 0.0),
                codes=codes[m],
                distances=assigned[m][1],
                commitment=commitment[m],
                codebook_loss=codebook_loss[m],
            )
            for m, x in xs.items()
        }

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, K] L2 distances of x [B, T, D] to every code, as ``forward`` measures them; updates nothing."""
        with torch.autocast(x.device.type, enabled=False):
            return self._assign(self._prepare(x), self.code_vectors().detach())[1]

    def pop_usage(self) -> dict[str, torch.Tensor]:
        """Per-input code histograms [K] (valid positions of training forwards, this rank) since the last call;
        resets them."""
        usage, self._usage = self._usage, {}
        return {m: c.cpu() for m, c in usage.items()}

    def usage_stats(self) -> dict[str, float]:
        """``perplexity``, ``dead_fraction`` (codes used by no input) over all inputs, and per input ``perplexity/m``
        and ``usage/m`` (fraction of codes it used), over the training forwards since the last call, on this rank."""
        usage = self.pop_usage()
        if not usage:
            return {}
        total = torch.stack(list(usage.values())).sum(0)
        stats = {"perplexity": perplexity(total), "dead_fraction": (total == 0).double().mean().item()}
        for m, counts in usage.items():
            stats[f"perplexity/{m}"] = perplexity(counts)
            stats[f"usage/{m}"] = (counts > 0).double().mean().item()
        return stats

    # ------------------------------------------------------------------------------------------------------------
    def _checked_masks(
        self, inputs: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        if not inputs:
            raise ValueError("the codebook got no inputs")
        out = {}
        for m, x in inputs.items():
            if x.ndim != 3 or x.shape[-1] != self.dim:
                raise ValueError(f"codebook input {m!r}: expected [B, T, {self.dim}], got {list(x.shape)}")
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if masks is None else masks[m].bool()
            if mask.shape != x.shape[:2]:
                raise ValueError(f"codebook input {m!r}: mask {list(mask.shape)} does not match {list(x.shape[:2])}")
            out[m] = mask
        if (self.mm_ema or self.cross_commitment) and len(out) > 1:
            first = next(iter(out))
            for m, mask in out.items():
                if mask.shape != out[first].shape or not torch.equal(mask, out[first]):
                    raise ValueError(
                        "mm_ema / cross_commitment (CMG extensions) pair features at the same (sample, position), "
                        f"so every input needs the same positions and mask; {first!r} has {list(out[first].shape)}, "
                        f"{m!r} has {list(mask.shape)} (or a different mask). Turn both options off for these inputs."
                    )
        return out

    def _assign(self, x: torch.Tensor, embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [B,T], L2 distances [B,T,K] with grad to x, nearest codes [B,T,D]) in the codebook's dtype."""
        b, t, _ = x.shape
        d2 = squared_distances(x.reshape(b * t, -1).to(embed.dtype), embed)
        codes = d2.detach().argmin(-1)
        distances = d2.clamp_min(SQRT_FLOOR).sqrt().reshape(b, t, -1)
        return codes.reshape(b, t), distances, embed[codes].reshape(b, t, -1)

    def _statistics(self, xs: dict[str, torch.Tensor], codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per input: code counts and sums of its EMA targets (x itself, or CMG's mixed target with mm_ema)."""
        names = list(xs)
        out = self.unused_steps.new_zeros(len(names), self.num_codes, 1 + self.dim, dtype=self.code_dtype)
        for i, m in enumerate(names):
            valid = (codes[m] >= 0).unsqueeze(-1)
            target = self._mixed_target(xs, m) if self.mm_ema and len(names) > 1 else xs[m]
            target = target.detach().to(out.dtype)
            # padded rows become zeros added to code 0 (no boolean indexing: fixed shapes, no host read)
            rows = torch.cat([torch.ones_like(target[..., :1]), target], dim=-1) * valid
            out[i].index_add_(0, codes[m].clamp_min(0).flatten(), rows.flatten(0, 1))
        return out

    @staticmethod
    def _mixed_target(xs: dict[str, torch.Tensor], own: str) -> torch.Tensor:
        others = [x for m, x in xs.items() if m != own]
        return 0.5 * xs[own] + (0.5 / len(others)) * torch.stack(others).sum(0)

    def _commitment(
        self,
        xs: dict[str, torch.Tensor],
        nearest: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        valid: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Mean over valid positions and dimensions; in training the denominator counts every rank's positions and
        the loss is scaled by the world size, so averaging gradients over ranks equals one process."""
        scale = world_size() if self.training else 1
        names = list(xs)
        out = {}
        for i, m in enumerate(names):
            norm = scale / (valid[i].clamp_min(1) * self.dim)

            def sq_error(e: torch.Tensor, m: str = m) -> torch.Tensor:
                err = (xs[m].to(e.dtype) - e.detach()).pow(2).sum(-1)  # in the codebook's precision
                return err.masked_fill(~masks[m], 0.0).sum()

            if self.cross_commitment and len(names) > 1:
                cross = sum(sq_error(nearest[o]) for o in names if o != m) / (len(names) - 1)
                loss = 2.0 * sq_error(nearest[m]) + cross
            else:
                loss = sq_error(nearest[m])
            out[m] = self.commitment_weight * loss * norm
        return out

    def _codebook_loss(
        self,
        xs: dict[str, torch.Tensor],
        live: torch.Tensor,
        codes: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        valid: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``||sg(x) - e||^2`` per input, normalised like the commitment (so ranks average to one process), for codes
        trained by gradient; 0 for EMA codes (their gradient would go nowhere)."""
        if not self.trained_codes:
            return {m: live.new_zeros(()) for m in xs}
        scale = world_size() if self.training else 1
        out = {}
        for i, (m, x) in enumerate(xs.items()):
            err = (x.detach().to(live.dtype) - live[codes[m].clamp_min(0)]).pow(2).sum(-1)
            out[m] = err.masked_fill(~masks[m], 0.0).sum() * scale / (valid[i].clamp_min(1) * self.dim)
        return out

    @torch.no_grad()
    def _ema_step(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        self.cluster_size.copy_((self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.embed.copy_(self.embed_sum / self.cluster_size.unsqueeze(-1))

    @torch.no_grad()
    def _update(self, stats: torch.Tensor) -> None:
        """Joint: one EMA step from all inputs' statistics. MM-EMA: one step per input, in order, as CMG does."""
        steps = stats if self.mm_ema else stats.sum(0, keepdim=True)
        for s in steps:
            self._ema_step(s[:, 0], s[:, 1:])

    @torch.no_grad()
    def _restart_dead(self, used: torch.Tensor, xs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        """Count batches without use; move codes unused for ``dead_code_threshold`` batches onto random encoder
        vectors of this batch (rank 0's, broadcast, so every rank restarts identically; counters are the same on
        every rank, built from statistics summed over ranks).

        Done every training batch with fixed-shape tensor operations (no ``nonzero``, no host read of how many codes
        died): a candidate vector is drawn for every code and only the dead ones take it (``_restart``)."""
        self.unused_steps.add_(1).masked_fill_(used, 0)
        if self.dead_code_threshold <= 0:
            return
        pool = torch.cat([x.detach().flatten(0, 1) for x in xs.values()])  # [N, D], padded rows included
        seen = torch.cat([masks[m].flatten() for m in xs]).cumsum(0)  # valid rows up to each row
        # the i-th valid row (i uniform in [0, valid rows)) is the first row where ``seen`` exceeds i
        draws = (torch.rand(self.num_codes, device=pool.device) * seen[-1]).long().clamp_max(seen[-1] - 1)
        picks = torch.searchsorted(seen, draws, right=True).clamp_max(len(pool) - 1)
        fresh = _from_rank0_(pool[picks].to(self.code_dtype).contiguous())  # drawn on every rank, rank 0's used
        dead = (self.unused_steps >= self.dead_code_threshold) & (seen[-1] > 0)
        self._restart(dead, fresh)
        self.unused_steps.masked_fill_(dead, 0)

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, fresh: torch.Tensor) -> None:
        """Codes where ``dead`` [K] become ``fresh`` [K, D], as if each had been assigned one vector (N = 1, W = E)."""
        self.embed.copy_(torch.where(dead.unsqueeze(-1), fresh.to(self.embed.dtype), self.embed))
        self.cluster_size.masked_fill_(dead, 1.0)
        self.embed_sum.copy_(torch.where(dead.unsqueeze(-1), self.embed, self.embed_sum))

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor, counts: torch.Tensor) -> None:
        """Codes ``index`` become ``vectors``, as if each had been assigned ``counts`` vectors (EMA: N, W = N E)."""
        self.embed[index] = vectors.to(self.embed.dtype)
        self.cluster_size[index] = counts.to(self.cluster_size.dtype)
        self.embed_sum[index] = self.embed[index] * self.cluster_size[index].unsqueeze(-1)

    @torch.no_grad()
    def _kmeans_init(self, vectors: torch.Tensor) -> None:
        """Lloyd's k-means on the first batch's valid vectors (all inputs, all ranks); seeds drawn on rank 0."""
        vectors = vectors.to(self.code_dtype)
        n = len(vectors)
        picks = torch.randperm(n, device=vectors.device)[: self.num_codes] if n >= self.num_codes else None
        if picks is None:
            picks = torch.randint(n, (self.num_codes,), device=vectors.device)
        centroids = _from_rank0_(vectors[picks].contiguous())
        counts = torch.zeros(self.num_codes, dtype=vectors.dtype, device=vectors.device)
        for _ in range(self.kmeans_iters):
            codes = squared_distances(vectors, centroids).argmin(-1)
            stats = vectors.new_zeros(self.num_codes, 1 + self.dim)
            stats.index_add_(0, codes, torch.cat([torch.ones_like(vectors[:, :1]), vectors], dim=-1))
            _sum_over_ranks_(stats)
            counts = stats[:, 0]
            filled = counts > 0
            centroids[filled] = stats[filled, 1:] / counts[filled].unsqueeze(-1)
        self._set_codes(torch.arange(self.num_codes, device=centroids.device), centroids, counts.clamp_min(1.0))
        self.initted.fill_(True)

    @torch.no_grad()
    def _count_usage(self, codes: dict[str, torch.Tensor]) -> None:
        for m, c in codes.items():  # a scatter, not bincount of the valid codes: fixed shapes, no host read
            counts = c.new_zeros(self.num_codes).scatter_add_(0, c.clamp_min(0).flatten(), (c >= 0).flatten().long())
            self._usage[m] = self._usage[m] + counts if m in self._usage else counts


class SimVectorQuantizer(EMAVectorQuantizer):
    """SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One Linear
    Layer"): the codes are ``C W^T``, a learned linear map W (``transform``) of a frozen random basis C [K, D]
    (buffer ``basis``, N(0, 1/D)). The loss ``||sg(x) - e||^2`` (``codebook_loss``) trains W, and every step of W
    moves all codes together, so unused codes follow the data instead of dying. No EMA.

    A dead code (``dead_code_threshold``) is restarted by solving ``c W^T = x`` for its basis row (pseudo-inverse
    of W), so the code lands on the chosen encoder vector; restarts and k-means init are the only writes to C.
    """

    trained_codes = True

    def _init_codes(self) -> None:
        self.register_buffer("basis", torch.randn(self.num_codes, self.dim) * self.dim**-0.5)
        self.transform = nn.Linear(self.dim, self.dim, bias=False)

    def code_vectors(self) -> torch.Tensor:
        return self.transform(self.basis)

    @property
    def code_dtype(self) -> torch.dtype:
        return self.basis.dtype

    def _update(self, stats: torch.Tensor) -> None:
        """No EMA: the codes move through W's gradient."""

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, fresh: torch.Tensor) -> None:
        """Only codes that died are solved for (a pseudo-inverse, which reads the host on CUDA anyway): this restart
        reads on the host whether any code died, so SimVQ with ``dead_code_threshold`` > 0 is not compile-clean."""
        if dead.any():
            index = dead.nonzero().squeeze(-1)
            self._set_codes(index, fresh[index], torch.ones(len(index), device=fresh.device))

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor, counts: torch.Tensor) -> None:
        w = self.transform.weight.detach().to(vectors.dtype)
        basis = self.basis.clone()  # a new tensor: this step's graph still holds the old basis for W's gradient
        basis[index] = (vectors @ torch.linalg.pinv(w.T)).to(basis.dtype)
        self.basis = basis


def fsq_bound(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """FSQ's bound (Mentzer et al. 2023): ``tanh(z + shift) * h - offset`` with ``h = (L - 1)(1 - eps) / 2``, offset
    1/2 for even L (0 for odd) and ``shift = atanh(offset / h)``, so that rounding gives exactly L integer levels,
    ``-(L // 2) .. (L - 1) // 2``, and ``bound(0) = 0``."""
    levels = levels.to(z.dtype)
    half = (levels - 1) * (1 - FSQ_EPS) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(z.dtype)
    return torch.tanh(z + torch.atanh(offset / half)) * half - offset


def fsq_indices(digits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of integer level vectors ``digits`` [..., d] (each in ``-(L // 2) .. (L - 1) // 2``): mixed radix,
    first dimension fastest."""
    radix = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
    return ((digits.long() + levels // 2) * radix).sum(-1)


def fsq_codes(indices: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The normalised code [..., d] of each index: integer level over ``L // 2`` (in [-1, 1])."""
    radix = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
    digits = (indices.unsqueeze(-1) // radix) % levels - levels // 2
    return digits / (levels // 2)


class FiniteScalarQuantizer(EMAVectorQuantizer):
    """Finite scalar quantisation (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"): each of
    the d = len(levels) dimensions is bounded (``fsq_bound``) and rounded to one of its L levels; the implicit
    codebook is the grid of all ``prod(levels)`` level vectors, normalised to [-1, 1] (buffer ``grid``). Nothing is
    learned in the quantiser and no code can die (no EMA, commitment or restart); the gradient passes the rounding
    by the straight-through estimator (or the rotation trick). Distances to the grid give CMCM's posteriors."""

    def __init__(self, levels: Sequence[int], *, estimator: Estimator = "ste") -> None:
        if not levels or min(levels) < 3:
            # L = 2 has no shift that centres the bound (atanh(0.5 / 0.4995) does not exist)
            raise ValueError(f"FSQ needs at least one dimension and >= 3 levels per dimension, got {list(levels)}")
        self.level_list = [int(v) for v in levels]
        super().__init__(
            math.prod(self.level_list),
            len(self.level_list),
            commitment_weight=0.0,
            dead_code_threshold=0,
            estimator=estimator,
        )

    def _init_codes(self) -> None:
        levels = torch.tensor(self.level_list)
        self.register_buffer("levels", levels, persistent=False)  # rebuilt from the config, never saved
        self.register_buffer("grid", fsq_codes(torch.arange(self.num_codes), levels).float(), persistent=False)

    def code_vectors(self) -> torch.Tensor:
        return self.grid

    @property
    def code_dtype(self) -> torch.dtype:
        return self.grid.dtype

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return fsq_bound(x, self.levels) / (self.levels // 2).to(x.dtype)

    def _assign(self, x: torch.Tensor, embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes by rounding each dimension (the nearest grid point); distances to every grid point as in VQ."""
        _, distances, _ = super()._assign(x, embed)
        digits = torch.round(x.detach().to(embed.dtype) * (self.levels // 2))
        codes = fsq_indices(digits, self.levels)
        return codes, distances, embed[codes]

    def _update(self, stats: torch.Tensor) -> None:
        """Nothing to update: the grid is fixed."""
