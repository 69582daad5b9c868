"""Finite Discrete Tokens (Chen et al. 2023): every modality is a sparse mixture of C learnable tokens it shares.

Per modality: queries ``q = Linear(LN(GELU(Linear(LN(x)))))`` of the fine-grained vectors, grounding
``s = q . FDT / sqrt(d) / T`` pooled over the vectors (fdt_grounding.py), weights ``w = sparsemax(s)`` over the C
tokens, embedding ``normalize(w @ FDT)``. The loss is the symmetric InfoNCE on these embeddings over every present
pair; there is no other loss (the sparsity constraint *is* sparsemax). See docs/bridges-fdt.md for every knob.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from codebridge.config import BridgeConfig, broken, num
from codebridge.distributed import all_reduce_mean
from codebridge.models.bridges.base import (
    BRIDGES,
    Bridge,
    DiscreteSpace,
    detached,
    modality_pairs,
    pairwise_contrastive,
)
from codebridge.models.bridges.fdt_grounding import pooled_scores, token_scores
from codebridge.models.bridges.host_reads import host_reads_free
from codebridge.models.bridges.sparsemax import AdaptiveTopkSparsemax, capped_sparsemax, sparsemax
from codebridge.models.features import BridgeOutput, Features


@dataclass
class FdtConfig:
    """``model.bridge.fdt``."""

    num_tokens: int = num(16384, ge=1)
    dim: int = num(512, ge=1)
    query_hidden: int | None = num(None, ge=1)  # None: same as dim
    pooling: Literal["max", "mean", "sum"] = "max"
    activation: Literal["sparsemax", "softmax", "sigmoid"] = "sparsemax"
    pad_mode: Literal["neg_inf", "zero"] = "neg_inf"  # "zero" reproduces the authors' x0 pad-mask quirk
    temperature: float = num(1000.0, gt=0)
    temperature_decay: float = num(1.0, gt=0)  # T = max(T0 * decay ** (step / every), floor); 1.0 = constant
    temperature_every: int = num(2700, ge=1)
    temperature_floor: float = num(0.01, gt=0)
    token_weight_decay: bool = True  # the authors' FDT table gets weight decay
    topk_sparsemax: bool = True  # partial top-k sparsemax (exact; falls back to larger k when needed)
    chunk_size: int = num(8, ge=0)  # >0: memory-lean max-pool in chunks of this many tokens (bit-equal); 0: naive
    temperature_staircase: bool = True  # the authors' solver recomputes T only when step % temperature_every == 0
    sparsemax_k: int = num(64, ge=1)  # first k of top-k sparsemax; afterwards k follows the observed support
    # decay: the authors' T0 * decay ** (step / every) with a floor; exponential / cosine: from T0 at step 0 to
    # temperature_final at temperature_final_step (log T linear, or a cosine in log T), constant after
    temperature_schedule: Literal["decay", "exponential", "cosine"] = "decay"
    temperature_final: float = num(0.01, gt=0)
    temperature_final_step: int = num(10000, ge=1)
    learnable_scale: bool = False  # a learned factor exp(g) on the grounding (g init 0, no weight decay)
    overuse_weight: float = num(0.0, ge=0)  # penalty on tokens whose batch-mean weight exceeds overuse_target
    overuse_target: float = num(0.05, gt=0, le=1)
    max_active: int = num(0, ge=0)  # >0: sparsemax over each row's max_active largest scores (a hard support cap)

    def check(self) -> list[str]:
        return broken(
            {
                "{max_active} caps sparsemax's support; set activation to sparsemax or max_active to 0": (
                    not self.max_active or self.activation == "sparsemax"
                )
            }
        )


def fdt_temperature(cfg: FdtConfig, step: int) -> float:
    """The grounding temperature at ``step`` (docs/bridges-fdt.md, *Temperature schedule*).

    decay: ``T = max(T0 * decay ** (step / every), floor)``; staircase: the exponent is step // every, as in the
    authors' solver. exponential: ``log T`` falls linearly from ``log T0`` to ``log temperature_final`` over
    ``temperature_final_step`` steps; cosine: ``log T = log Tf + (log T0 - log Tf) (1 + cos(pi p)) / 2`` with
    ``p = step / temperature_final_step``. Both stay at ``temperature_final`` afterwards.
    """
    if cfg.temperature_schedule == "decay":
        exponent = step // cfg.temperature_every if cfg.temperature_staircase else step / cfg.temperature_every
        return max(cfg.temperature * cfg.temperature_decay**exponent, cfg.temperature_floor)
    progress = min(max(step, 0) / cfg.temperature_final_step, 1.0)
    if cfg.temperature_schedule == "cosine":
        progress = (1 - math.cos(math.pi * progress)) / 2
    start, end = math.log(cfg.temperature), math.log(cfg.temperature_final)
    return math.exp(start + (end - start) * progress)


def overuse_penalty(weights: torch.Tensor, target: float) -> torch.Tensor:
    """``sum_c relu(mean_b w[b, c] - target)``: the batch-mean weight of every token above ``target``, so a token that
    carries a large share of every input's mixture (fires for everything) is pushed down and the others take over.

    The mean is over the global batch (every rank's rows, averaged without gradient), the gradient reaches this rank's
    rows at 1/B each, so N ranks averaging their gradients equal one process on the concatenated batch.
    """
    local = weights.mean(0)
    mean = local + (all_reduce_mean(local) - local).detach()
    return torch.relu(mean - target).sum()


def _softmax(s: torch.Tensor) -> torch.Tensor:
    return torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)


def _sigmoid(s: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(s.to(torch.promote_types(s.dtype, torch.float32)))


def query_mlp(width: int, hidden: int, dim: int) -> nn.Sequential:
    """The authors' Query_model map: LN -> Linear -> GELU -> LN -> Linear, from the encoder width to d."""
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, dim)
    )


class _Usage:
    """Token-usage counters of one logging window (this rank only: no collective, so no rank can wait on another).

    Counts stay on the weights' device as running sums, so updating them never waits for the device.
    """

    def __init__(self) -> None:
        self.ever: dict[str, torch.Tensor] = {}  # modality -> [C] bool: token active for some sample
        self.active: dict[str, torch.Tensor] = {}  # modality -> number of (sample, active token) pairs
        self.agree: dict[str, torch.Tensor] = {}  # "a-b" -> number of pairs whose top tokens are equal
        self.samples: dict[str, int] = {}  # modality or "a-b" -> samples counted

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        for m, w in weights.items():
            self._add(m, w.shape[0])
            self.ever[m] = (w > 0).any(0) | self.ever.get(m, False)
            self.active[m] = (w > 0).sum() + self.active.get(m, 0)
        for a, b in modality_pairs(weights):
            if weights[a].shape[0] == weights[b].shape[0]:
                self._add(f"{a}-{b}", weights[a].shape[0])
                same = (weights[a].argmax(-1) == weights[b].argmax(-1)).sum()
                self.agree[f"{a}-{b}"] = same + self.agree.get(f"{a}-{b}", 0)

    def _add(self, key: str, n: int) -> None:
        self.samples[key] = self.samples.get(key, 0) + n

    def summary(self) -> dict[str, float]:
        stats = {}
        for m, ever in self.ever.items():
            stats[f"fdt/{m}/used"] = ever.float().mean().item()
            stats[f"fdt/{m}/active"] = self.active[m].item() / self.samples[m]
        for pair, same in self.agree.items():
            stats[f"fdt/agree/{pair}"] = same.item() / self.samples[pair]
        return stats


@BRIDGES.register("fdt", config=FdtConfig)
class FdtBridge(Bridge):
    """Shared token table ``tokens`` [C, d] (N(0, 1) init), one query MLP per modality; embedding width is fdt.dim.

    extras per modality: ``weights`` [B, C] (the activation's output, for sigmoid not divided by its sum) and,
    with ``forward(..., token_scores=True)``, ``token_scores`` [B, T, C] (see ``token_fdt_scores``).
    The buffer ``step`` holds the last training step, so a saved model grounds at the temperature it reached.
    """

    def __init__(self, cfg: BridgeConfig, widths: dict[str, int]) -> None:
        super().__init__(cfg, widths)
        self.fdt = cfg.fdt
        self.tokens = nn.Parameter(torch.randn(cfg.fdt.num_tokens, cfg.fdt.dim))
        hidden = cfg.fdt.query_hidden or cfg.fdt.dim
        self.query = nn.ModuleDict({m: query_mlp(w, hidden, cfg.fdt.dim) for m, w in widths.items()})
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if cfg.fdt.learnable_scale:
            self.log_grounding_scale = nn.Parameter(torch.zeros(()))
        self._activation = self._make_activation()
        self._usage = _Usage()

    def _make_activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.fdt.activation == "sparsemax":
            if self.fdt.max_active:
                return partial(capped_sparsemax, k=self.fdt.max_active)
            return AdaptiveTopkSparsemax(self.fdt.sparsemax_k) if self.fdt.topk_sparsemax else sparsemax
        return _softmax if self.fdt.activation == "softmax" else _sigmoid

    def temperature(self, step: int | None = None) -> float:
        """Grounding temperature at ``step`` (None: the stored step of the last training forward)."""
        return fdt_temperature(self.fdt, int(self.step) if step is None else step)

    def _queries(self, m: str, f: Features) -> torch.Tensor:
        if m not in self.query:
            raise KeyError(f"fdt bridge: no query MLP for modality {m!r}; it was built for {sorted(self.query)}")
        # a host read: checked where it is free (CPU, eager); on an accelerator such an input gives a NaN loss, which
        # the trainer reports as a diverged step
        if self.fdt.pad_mode == "neg_inf" and host_reads_free(f.mask) and not bool(f.mask.any(1).all()):
            raise ValueError(f"fdt bridge: a {m} input has no real token (mask all False); nothing to ground on")
        return self.query[m](f.tokens)

    def forward(
        self, features: dict[str, Features], step: int | None = None, *, token_scores: bool = False
    ) -> dict[str, BridgeOutput]:
        """``step`` None (evaluation): use the stored step; in training mode a given step is also stored."""
        if step is not None and self.training:
            self.step.fill_(step)
        outputs, weights = self._ground(features, self.temperature(step), token_scores)
        if self.training:
            self._usage.update(weights)
        return outputs

    def _ground(
        self, features: dict[str, Features], temperature: float, token_scores: bool
    ) -> tuple[dict[str, BridgeOutput], dict[str, torch.Tensor]]:
        """(outputs, token weights per modality): the step's tensor work, without the Python temperature schedule
        and the usage counters (what ``compile_hot_path`` compiles)."""
        outputs, weights = {}, {}
        for m, f in features.items():
            q = self._queries(m, f)
            w = self._pooled_weights(q, f.mask, temperature)
            # the authors divide the sigmoid mixture by sum(w); the L2 normalisation below cancels that factor
            pooled = w.to(self.tokens.dtype) @ self.tokens
            extras = {"weights": w}
            if token_scores:
                extras["token_scores"] = self._token_scores(q, f.mask, temperature)
            outputs[m] = BridgeOutput(F.normalize(pooled, dim=-1), extras)
            weights[m] = w
        return outputs, weights

    def compile_hot_path(self, **options: Any) -> None:
        """Compiles ``_ground`` and ``_loss``: the temperature schedule's Python math (``math.exp``, ``math.cos``)
        would make a graph that contains it recompile at every step."""
        self._ground = torch.compile(self._ground, **options)
        self._loss = torch.compile(self._loss, **options)

    def _scaled(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores times the learned grounding scale (with ``learnable_scale``; a positive factor commutes with every
        pooling, so scaling after the pool equals scaling every position)."""
        if not self.fdt.learnable_scale:
            return scores
        return scores * self.log_grounding_scale.exp().to(scores.dtype)

    def _pooled_weights(self, q: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
        """[B, C] the activation of the grounding pooled over positions: each input's token weights."""
        fdt = self.fdt
        return self._activation(
            self._scaled(pooled_scores(q, self.tokens, mask, temperature, fdt.pooling, fdt.pad_mode, fdt.chunk_size))
        )

    def _token_scores(self, q: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
        return self._scaled(token_scores(q, self.tokens, mask, temperature, "neg_inf"))

    def token_fdt_scores(self, features: dict[str, Features]) -> dict[str, torch.Tensor]:
        """Per modality the grounding s [B, T, C] at the stored temperature, before pooling (for localization).

        Padded positions are -inf whatever ``pad_mode`` is, so they never look like a real (zero) score.
        """
        temperature = self.temperature()
        return {m: self._token_scores(self._queries(m, f), f.mask, temperature) for m, f in features.items()}

    def loss(
        self, outputs: dict[str, BridgeOutput], step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over every present pair of the symmetric InfoNCE on the FDT embeddings (negatives from all ranks), plus
        ``overuse_weight`` times the ``overuse_penalty`` of every modality's weights when that weight is > 0."""
        total, logs = self._loss(outputs)
        return total, logs | {"fdt/temperature": total.new_full((), self.temperature(step))}  # a fill, not a copy

    def _loss(self, outputs: dict[str, BridgeOutput]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss`` but the temperature it logs (what ``compile_hot_path`` compiles)."""
        fdt = self.fdt
        scale = self.logit_scale()
        embeddings = {m: out.embedding for m, out in outputs.items()}
        total, parts = pairwise_contrastive(embeddings, scale, self.cfg.margin, prefix="loss/contrastive")
        if fdt.overuse_weight > 0:
            overuse = torch.stack(
                [overuse_penalty(out.extras["weights"], fdt.overuse_target) for out in outputs.values()]
            ).sum()
            total = total + fdt.overuse_weight * overuse
            parts["loss/overuse"] = overuse
        active = torch.stack([(out.extras["weights"] > 0).sum(-1).float().mean() for out in outputs.values()]).mean()
        logs = {
            "logit_scale": scale,
            "fdt/active": active,
            "fdt/token_norm": self.tokens.detach().norm(dim=-1).mean(),
        }
        if fdt.learnable_scale:
            logs["fdt/grounding_scale"] = self.log_grounding_scale.exp()
        return total, detached(parts | logs)

    @classmethod
    def describe(cls, cfg: BridgeConfig) -> str:
        fdt = cfg.fdt
        return f"fdt: {fdt.num_tokens} shared tokens of dim {fdt.dim}, {fdt.activation}, {fdt.pooling} pooling"

    def _scores(self, m: str, f: Features) -> torch.Tensor:
        """[B, T, C] the grounding s of each position at the stored temperature; 0 at padding."""
        return self.token_fdt_scores({m: f})[m].masked_fill(~f.mask.bool().unsqueeze(-1), 0.0)

    def _position_weights(self, m: str, f: Features) -> torch.Tensor:
        """[B, T, C] the bridge's activation applied to each position's own (unpooled) row of scores."""
        return self._activation(self._scores(m, f))

    def _input_weights(self, m: str, f: Features) -> torch.Tensor:
        """[B, C] each input's token weights, as ``forward`` computes them (without counting usage)."""
        return self._pooled_weights(self._queries(m, f), f.mask, self.temperature())

    def discrete_space(self) -> DiscreteSpace:
        """The shared token table: scores are the grounding s, weights the activation of each position's scores,
        mass each input's pooled token weights (the sparsemax weight mass)."""
        return DiscreteSpace(
            unit="token",
            vectors=self.tokens.detach(),
            scores=self._scores,
            weights=lambda m, f: self._position_weights(m, f).masked_fill(~f.mask.bool().unsqueeze(-1), 0.0),
            mass=self._input_weights,
            mass_unit="token weight mass",
        )

    def affinity(self, query: str, q: Features, target: str, t: Features) -> torch.Tensor:
        """The query position's token weights (the activation of its own scores) dotted with each target position's
        scores: how strongly that position grounds on the tokens the query selects."""
        return self._position_weights(query, q) @ self._scores(target, t).transpose(1, 2)

    def no_weight_decay(self) -> set[str]:
        """The authors decay the token table (it is not in their no-decay list); token_weight_decay=False opts out.
        The learned grounding scale is a log-scale like the logit scale: never decayed."""
        names = super().no_weight_decay() | ({"log_grounding_scale"} if self.fdt.learnable_scale else set())
        return names if self.fdt.token_weight_decay else names | {"tokens"}

    def retrieval_parts(self, output: BridgeOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The FDT embedding (continuous) and the normalised token weights (discrete): the authors' evaluator also
        scores the cosine of sparsemax weight vectors ("FDT-weight", papers.md B4)."""
        weights = output.extras["weights"]
        return output.embedding, F.normalize(weights.to(output.embedding.dtype), dim=-1)

    def usage(self) -> dict[str, float]:
        """Over the training forwards since the last call, on this rank: per modality ``fdt/{m}/used`` (fraction of
        tokens active for some sample), ``fdt/{m}/active`` (mean active tokens per sample); per pair
        ``fdt/agree/{a}-{b}`` (fraction of pairs whose top-weighted tokens are equal)."""
        stats = self._usage.summary()
        self._usage = _Usage()
        return stats
