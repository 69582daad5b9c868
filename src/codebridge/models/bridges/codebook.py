"""Shared VQ codebook with Cross-Modal Code Matching (Liu et al. 2022, "Cross-Modal Discrete Representation Learning").

Per modality m: fine-grained tokens are projected to the code dimension, ``h = Linear(tokens)``, and quantised with
ONE codebook shared by every modality (vector_quantizer.py); the summary is projected to ``embed_dim``. Losses
(papers.md A2, docs/bridges-codebook.md):

- summary: symmetric InfoNCE on ``normalize(summary_proj(summary))`` over every pair (optional margin);
- CMCM: ``p_t(k) = softmax_k(-||h_t - e_k||_2)``, ``P = mean_t p_t`` over valid positions, score
  ``S(a_i, b_j) = sum_k [P_a_i(k) log P_b_j(k) + P_b_j(k) log P_a_i(k)]``, InfoNCE over the batch on S;
- discrete summary: InfoNCE on ``normalize(discrete_proj(masked mean of the quantised tokens)))``;
- commitment: ``beta ||h - sg(e)||^2`` (the codebook itself is updated by EMA, not by gradient).

Retrieval embedding: ``concat(normalize(cont), sqrt(lambda) * normalize(disc))``, so that the dot product of two
embeddings is ``S_cont + lambda * S_disc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from codebridge.config import BridgeConfig, broken, num
from codebridge.distributed import gather_with_grad, rank
from codebridge.models.bridges.base import (
    BRIDGES,
    Bridge,
    DiscreteSpace,
    detached,
    modality_pairs,
    pairwise_contrastive,
)
from codebridge.models.bridges.vector_quantizer import (
    EMAVectorQuantizer,
    FiniteScalarQuantizer,
    SimVectorQuantizer,
)
from codebridge.models.features import BridgeOutput, Features

LOG_EPS = 1e-10  # CMG's log(P + 1e-10)


@dataclass
class CodebookConfig:
    """``model.bridge.codebook``."""

    size: int = num(1024, ge=1)
    dim: int | None = num(None, ge=1)  # None: the bridge's embed_dim
    decay: float = num(0.99, ge=0, lt=1)
    eps: float = num(1e-5, gt=0)
    commitment_weight: float = num(0.25, ge=0)
    cmcm_weight: float = num(0.5, ge=0)  # CMG: cmcm = 0.5 * sum of the pair losses (Paper A's alpha is unverified)
    summary_weight: float = num(1.0, ge=0)
    discrete_summary_weight: float = num(1.0, ge=0)
    discrete_ste: bool = True  # the discrete InfoNCE reaches the tokens through the straight-through estimator
    fusion_lambda: float = num(1.0, ge=0)  # S = S_cont + lambda * S_disc at retrieval time (a weight)
    dead_code_threshold: int = num(300, ge=0)  # batches without use before a code is restarted (0: never)
    kmeans_init: bool = False
    kmeans_iters: int = num(10, ge=0)
    cmcm_margin: float = num(0.0, ge=0)
    cmcm_symmetric: bool = False  # CMG: row softmax only; True averages both directions (ours)
    mm_ema: bool = False  # CMG extension: multimodal EMA update
    cross_commitment: bool = False  # CMG extension: commit to the paired modality's codes too
    quantizer: Literal["vq", "fsq"] = "vq"  # fsq: finite scalar quantisation, K = prod(fsq_levels), dim = len
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # Mentzer et al.'s K ~ 1000 setting
    parametrization: Literal["ema", "simvq"] = "ema"  # vq only; simvq: codes = frozen basis x learned W
    estimator: Literal["ste", "rotation"] = "ste"  # how gradients pass the quantisation (rotation: Fifty et al.)

    def check(self) -> list[str]:
        fsq = self.quantizer == "fsq"
        return broken(
            {
                "{fsq_levels}: every dimension needs at least 3 levels": bool(self.fsq_levels)
                and min(self.fsq_levels) >= 3,
                "{quantizer}: fsq has its own grid; set parametrization to ema (its default), or use vq": not fsq
                or self.parametrization == "ema",
                "{dim}: with quantizer fsq the code dimension is len(fsq_levels); leave dim null": not fsq
                or self.dim is None,
                "{quantizer}: fsq learns nothing in the quantiser; turn kmeans_init, mm_ema and cross_commitment "
                "off": not fsq or not (self.kmeans_init or self.mm_ema or self.cross_commitment),
                "{mm_ema}: the EMA extension needs parametrization ema": not self.mm_ema
                or self.parametrization == "ema",
            }
        )

    @property
    def num_codes(self) -> int:
        """K: ``size``, or the FSQ grid's ``prod(fsq_levels)``."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.size

    def code_dim(self, embed_dim: int) -> int:
        """The code dimension: ``len(fsq_levels)`` for FSQ, else ``dim`` (null: ``embed_dim``)."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.dim or embed_dim


def build_quantizer(cb: CodebookConfig, dim: int) -> EMAVectorQuantizer:
    """The quantiser the config asks for: EMA VQ (CMCM's), SimVQ, or FSQ."""
    if cb.quantizer == "fsq":
        return FiniteScalarQuantizer(cb.fsq_levels, estimator=cb.estimator)
    kind = SimVectorQuantizer if cb.parametrization == "simvq" else EMAVectorQuantizer
    return kind(
        cb.size,
        dim,
        decay=cb.decay,
        eps=cb.eps,
        commitment_weight=cb.commitment_weight,
        dead_code_threshold=cb.dead_code_threshold,
        kmeans_init=cb.kmeans_init,
        kmeans_iters=cb.kmeans_iters,
        mm_ema=cb.mm_ema,
        cross_commitment=cb.cross_commitment,
        estimator=cb.estimator,
    )


def code_distribution(distances: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """P [B, K]: the mean over valid positions of ``softmax_k(-distance)`` (plain L2, no temperature)."""
    p = torch.softmax(-distances, dim=-1).masked_fill(~mask.unsqueeze(-1), 0.0)
    return p.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(p.dtype)


def code_match_scores(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``S[i, j] = sum_k rows_i(k) log cols_j(k) + cols_j(k) log rows_i(k)``: the negative symmetric cross-entropy.

    CMG's matrix code writes the second term as ``P_b @ log(P_a)^T``, i.e. ``P_b_i log P_a_j``, so only its diagonal
    equals this per-pair formula; we follow the formula (papers.md A2.3).
    """
    return rows @ torch.log(cols + LOG_EPS).T + torch.log(rows + LOG_EPS) @ cols.T


def cmcm_loss(pa: torch.Tensor, pb: torch.Tensor, margin: float = 0.0, symmetric: bool = False) -> torch.Tensor:
    """Cross-Modal Code Matching for one pair: InfoNCE on S with this rank's rows and every rank's columns.

    Row only (CMG): ``-1/B sum_i log(exp S_ii / sum_j exp S_ij)``; ``symmetric`` also takes the b -> a direction
    and averages. ``margin`` is subtracted from the positive score. Cross-entropy's log-sum-exp replaces CMG's
    global ``-min(S)`` shift: it is exactly shift-invariant, and CMG's extra ``+1e-5`` in the denominator changes
    the loss by at most 1e-5 (after its shift every term of the sum is >= 1). No temperature, as in CMG.
    """
    directions = [(pa, pb), (pb, pa)] if symmetric else [(pa, pb)]
    losses = []
    for rows, cols in directions:
        scores = code_match_scores(rows, gather_with_grad(cols))  # [B, world * B]
        labels = torch.arange(len(rows), device=rows.device) + rank() * len(rows)
        if margin:
            scores = scores - margin * F.one_hot(labels, scores.shape[1]).to(scores.dtype)
        losses.append(F.cross_entropy(scores, labels))
    return torch.stack(losses).mean()


def dominant_codes(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The most frequent code of each sequence over valid positions (-1 where none; ties: smallest index)."""
    valid = codes >= 0
    counts = codes.new_zeros(codes.shape[0], num_codes).scatter_add_(1, codes.clamp_min(0), valid.long())
    return counts.argmax(-1).masked_fill(~valid.any(-1), -1)


class _Agreement:
    """Per pair (and over all modalities): samples whose dominant codes match, and samples seen (CMG's equal_num).
    Both are device tensors: counting never waits for the device, nor recompiles a compiled forward."""

    def __init__(self) -> None:
        self.matches: dict[str, torch.Tensor] = {}
        self.seen: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, dominant: dict[str, torch.Tensor]) -> None:
        names = sorted(dominant)
        if len(names) < 2:
            return
        first = dominant[names[0]]
        groups = {f"{a}-{b}": dominant[a] == dominant[b] for a, b in modality_pairs(dominant)}
        groups["all"] = torch.stack([dominant[m] == first for m in names]).all(0)
        for key, same in groups.items():
            self.matches[key] = self.matches.get(key, 0) + same.sum()
            self.seen[key] = torch.full((), len(same), device=same.device) + self.seen.get(key, 0)

    def summary(self) -> dict[str, float]:
        return {
            ("agreement" if k == "all" else f"agreement/{k}"): float(self.matches[k]) / self.seen[k].item()
            for k in self.seen
        }


@BRIDGES.register("codebook", config=CodebookConfig)
class CodebookBridge(Bridge):
    """Shared EMA codebook + CMCM. ``extras`` of each modality's ``BridgeOutput``:

    codes [B,T] (nearest code, -1 on padding), code_probs [B,K] (P), token_mask [B,T], continuous [B,E] and
    discrete [B,E] (the two normalised halves of the embedding), commitment (scalar loss).
    """

    def __init__(self, cfg: BridgeConfig, widths: dict[str, int]) -> None:
        super().__init__(cfg, widths)
        cb = self.cb = cfg.codebook
        dim = cb.code_dim(cfg.embed_dim)
        self.token_proj = nn.ModuleDict({m: nn.Linear(w, dim) for m, w in widths.items()})
        self.summary_proj = nn.ModuleDict({m: nn.Linear(w, cfg.embed_dim, bias=False) for m, w in widths.items()})
        for m, w in widths.items():
            nn.init.normal_(self.summary_proj[m].weight, std=w**-0.5)  # CLIP's projection init
        # One projection for every modality (ours): the same codes give the same discrete summary in any modality.
        self.discrete_proj = nn.Linear(dim, cfg.embed_dim, bias=False)
        self.codebook = build_quantizer(cb, dim)
        self._agreement = _Agreement()

    def forward(self, features: dict[str, Features], step: int = 0) -> dict[str, BridgeOutput]:
        unknown = sorted(set(features) - set(self.widths))
        if unknown:
            raise KeyError(f"codebook bridge built for {sorted(self.widths)}, got features for {unknown}")
        names = sorted(features)  # a stable order: MM-EMA updates the codebook modality by modality
        masks = {m: features[m].mask.bool() for m in names}
        quantized = self.codebook({m: self.token_proj[m](features[m].tokens) for m in names}, masks)
        fusion = math.sqrt(self.cb.fusion_lambda)
        outputs = {}
        for m in names:
            q, mask = quantized[m], masks[m]
            cont = F.normalize(self.summary_proj[m](features[m].summary), dim=-1)
            tokens = q.quantized if self.cb.discrete_ste else q.quantized.detach()
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(tokens.dtype)
            disc = F.normalize(self.discrete_proj(pooled), dim=-1)
            extras = {
                "codes": q.codes,
                "code_probs": code_distribution(q.distances, mask),
                "token_mask": mask,
                "continuous": cont,
                "discrete": disc,
                "commitment": q.commitment,
                "codebook_loss": q.codebook_loss,
            }
            outputs[m] = BridgeOutput(torch.cat([cont, fusion * disc.to(cont.dtype)], dim=-1), extras)
        if self.training:
            self._agreement.add({m: dominant_codes(outputs[m].extras["codes"], self.codebook.num_codes) for m in names})
        return outputs

    def loss(self, outputs: dict[str, BridgeOutput], step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """``summary_weight L_summary + discrete_summary_weight L_disc + cmcm_weight L_cmcm + commitment``, each
        summed over every present pair (commitment over modalities); per-pair parts are logged too."""
        cb = self.cb
        scale = self.logit_scale()
        summary, parts = pairwise_contrastive(
            {m: o.extras["continuous"] for m, o in outputs.items()}, scale, self.cfg.margin, prefix="loss/summary"
        )
        discrete, disc_parts = pairwise_contrastive(
            {m: o.extras["discrete"] for m, o in outputs.items()}, scale, self.cfg.margin, prefix="loss/discrete"
        )
        parts |= disc_parts
        for a, b in modality_pairs(outputs):
            pa, pb = outputs[a].extras["code_probs"], outputs[b].extras["code_probs"]
            parts[f"loss/cmcm/{a}-{b}"] = cmcm_loss(pa, pb, cb.cmcm_margin, cb.cmcm_symmetric)
        cmcm = torch.stack([v for k, v in parts.items() if k.startswith("loss/cmcm/")]).sum()
        commitment = torch.stack([o.extras["commitment"] for o in outputs.values()]).sum()
        codebook = torch.stack([o.extras["codebook_loss"] for o in outputs.values()]).sum()
        total = cb.summary_weight * summary + cb.discrete_summary_weight * discrete + cb.cmcm_weight * cmcm
        total = total + commitment + codebook
        named = {"loss/summary": summary, "loss/discrete": discrete, "loss/cmcm": cmcm, "loss/commitment": commitment}
        if self.codebook.trained_codes:
            named["loss/codebook"] = codebook
        return total, detached(named | parts | {"logit_scale": scale})

    @classmethod
    def describe(cls, cfg: BridgeConfig) -> str:
        cb = cfg.codebook
        kind = "FSQ" if cb.quantizer == "fsq" else "SimVQ" if cb.parametrization == "simvq" else "VQ"
        estimator = ", rotation trick" if cb.estimator == "rotation" else ""
        return (
            f"codebook: {cb.num_codes} shared {kind} codes (dim {cb.code_dim(cfg.embed_dim)}{estimator}), "
            f"CMCM weight {cb.cmcm_weight}, fusion lambda {cb.fusion_lambda}"
        )

    def _scores(self, m: str, f: Features) -> torch.Tensor:
        """[B, T, K] minus the L2 distance of each projected position to each code (as the quantiser measures it);
        0 at padding."""
        if m not in self.token_proj:
            raise KeyError(f"codebook bridge: no projection for modality {m!r}; it was built for {sorted(self.widths)}")
        return -self.codebook.distances(self.token_proj[m](f.tokens)).masked_fill(~f.mask.bool().unsqueeze(-1), 0.0)

    def _posteriors(self, m: str, f: Features) -> torch.Tensor:
        """[B, T, K] ``p_t(k) = softmax_k(-||h_t - e_k||)``, CMCM's per-position distribution; 0 at padding."""
        return torch.softmax(self._scores(m, f), -1).masked_fill(~f.mask.bool().unsqueeze(-1), 0.0)

    def _counts(self, m: str, f: Features) -> torch.Tensor:
        """[B, K] positions of each input assigned to each code."""
        codes = self.discrete_space().assignments(m, f)
        hits = F.one_hot(codes.clamp_min(0), self.codebook.num_codes) * (codes >= 0).unsqueeze(-1)
        return hits.sum(1)

    def discrete_space(self) -> DiscreteSpace:
        """The shared codebook: scores are minus the L2 distances, weights the CMCM posteriors ``p_t``, mass the
        number of positions assigned to each code."""
        return DiscreteSpace(
            unit="code",
            vectors=self.codebook.code_vectors().detach(),
            scores=self._scores,
            weights=self._posteriors,
            mass=self._counts,
            mass_unit="token positions",
        )

    def affinity(self, query: str, q: Features, target: str, t: Features) -> torch.Tensor:
        """``sim[q, t] = sum_k p_q(k) p(t | k)`` with ``p(t | k) = p_t(k) / sum_t' p_t'(k)``: the chance that a code
        drawn by the query position is drawn at target position t. Codes shared by the whole target (background)
        spread over all its positions, so positions sharing *rare* codes with the query stand out; a row sums to 1."""
        pq = torch.softmax(self._scores(query, q), -1)
        pt = torch.softmax(self._scores(target, t), -1) * t.mask.unsqueeze(-1)
        return pq @ (pt / pt.sum(1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)

    def retrieval_parts(self, output: BridgeOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised continuous summary and the normalised discrete summary (the two halves of the
        embedding before ``fusion_lambda``)."""
        return output.extras["continuous"], output.extras["discrete"]

    def no_weight_decay(self) -> set[str]:
        """SimVQ's W is the codebook: weight decay would shrink every code towards 0."""
        names = super().no_weight_decay()
        return names | {"codebook.transform.weight"} if isinstance(self.codebook, SimVectorQuantizer) else names

    def usage(self) -> dict[str, float]:
        """Over the training forwards since the last call, on this rank: ``codebook/perplexity``,
        ``codebook/dead_fraction``, per modality ``codebook/perplexity/m`` and ``codebook/usage/m``, and the
        cross-modal code agreement: the fraction of paired samples whose dominant codes match, per pair
        (``codebook/agreement/a-b``) and over all modalities (``codebook/agreement``, CMG's equal_num / B)."""
        stats = self.codebook.usage_stats() | self._agreement.summary()
        self._agreement = _Agreement()
        return {f"codebook/{k}": v for k, v in stats.items()}
