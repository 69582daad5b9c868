"""What every bridge shares: the registry, the interface eval and the report ask (``Bridge``, ``DiscreteSpace``), the
learnable logit scale and the symmetric InfoNCE over ranks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from codebridge.config import BridgeConfig
from codebridge.distributed import gather_with_grad, rank
from codebridge.models.features import BridgeOutput, Features
from codebridge.registry import Registry

BRIDGES: Registry[type[Bridge]] = Registry("bridge")

# FDT's "param" clamp keeps ln(scale) in [3, 6], i.e. scale in [e^3 ~ 20.1, e^6 ~ 403] before the forward clamp.
PARAM_CLAMP = (3.0, 6.0)


class LogitScale(nn.Module):
    """Learnable inverse temperature, stored as ln(scale) (init 1/0.07), clamped at ``max_logit_scale``."""

    def __init__(self, cfg: BridgeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        init = math.log(cfg.init_logit_scale)
        if cfg.logit_scale_clamp == "param":
            init = min(max(init, PARAM_CLAMP[0]), PARAM_CLAMP[1])
        self.log_scale = nn.Parameter(torch.tensor(init))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.cfg.max_logit_scale)

    @torch.no_grad()
    def post_step(self) -> None:
        """Called by the trainer after every optimizer step (the authors' FDT raw-parameter clamp)."""
        if self.cfg.logit_scale_clamp == "param":
            self.log_scale.clamp_(*PARAM_CLAMP)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` ([B, E], already normalised).

    Rows are this rank's samples, columns every rank's (gathered with gradient); the loss is the mean over this
    rank's rows, so averaging gradients over N ranks equals one process on the concatenated batch.
    ``margin`` is subtracted from the positive similarity before scaling (masked margin softmax).
    """
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
    sim_ab = a @ all_b.T  # [B, N*B]
    sim_ba = b @ all_a.T
    if margin:
        positive = F.one_hot(labels, all_b.shape[0]).to(sim_ab.dtype)
        sim_ab = sim_ab - margin * positive
        sim_ba = sim_ba - margin * positive
    return (F.cross_entropy(scale * sim_ab, labels) + F.cross_entropy(scale * sim_ba, labels)) / 2


def modality_pairs(outputs: dict[str, object]) -> list[tuple[str, str]]:
    """Every unordered pair of present modalities, in a stable order."""
    return list(itertools.combinations(sorted(outputs), 2))


def pairwise_contrastive(
    embeddings: dict[str, torch.Tensor], scale: torch.Tensor, margin: float = 0.0, prefix: str = "contrastive"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of ``contrastive_loss`` over every present pair; parts are named ``{prefix}/{a}-{b}``."""
    parts = {
        f"{prefix}/{a}-{b}": contrastive_loss(embeddings[a], embeddings[b], scale, margin)
        for a, b in modality_pairs(embeddings)
    }
    if not parts:
        raise ValueError(f"a contrastive loss needs two modalities, got {sorted(embeddings)}")
    return torch.stack(list(parts.values())).sum(), parts


def detached(logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss parts for the log: tensors without their graph; the trainer makes numbers of them once per log line."""
    return {name: value.detach() for name, value in logs.items()}


PerPosition = Callable[[str, Features], torch.Tensor]  # (modality, its encoder features) -> a tensor


@dataclass(frozen=True)
class DiscreteSpace:
    """A bridge's shared discrete space (codes, tokens) as code analysis, localization and the report read it.

    Every function takes a modality and its encoder ``Features`` (tokens [B, T, D], mask [B, T]) and answers with the
    bridge's own computation (no copy of it outside the bridge):

    - ``scores`` [B, T, K]: how strongly each position belongs to each element (higher: more); its argmax is the
      position's assignment. Padded positions are 0.
    - ``weights`` [B, T, K]: the bridge's per-position assignment weights (code posteriors, token activations).
      Padded positions are 0.
    - ``mass`` [B, K]: how much each input uses each element, in ``mass_unit``; the report sums it over the data.
    """

    unit: str  # what one element is called in reports: "code", "token"
    vectors: torch.Tensor  # [K, D] the elements
    scores: PerPosition
    weights: PerPosition
    mass: PerPosition
    mass_unit: str  # what ``mass`` counts, e.g. "token positions"

    @property
    def size(self) -> int:
        """K, the number of elements."""
        return self.vectors.shape[0]

    def assignments(self, modality: str, features: Features) -> torch.Tensor:
        """[B, T] long: each position's element (argmax of ``scores``), -1 at padding."""
        return self.scores(modality, features).argmax(-1).masked_fill(~features.mask.bool(), -1)


class Bridge(nn.Module):
    """Base class: subclasses map encoder ``Features`` to ``BridgeOutput`` and define the training loss.

    Everything outside ``models/bridges/`` asks the bridge (never its name or its internals): ``describe`` for
    reports, ``discrete_space`` for code analysis and usage, ``affinity`` for localization, ``usage`` for the
    training log. The defaults describe a bridge without a discrete space or position affinity.
    """

    def __init__(self, cfg: BridgeConfig, widths: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.widths = dict(widths)
        self.logit_scale = LogitScale(cfg)

    def forward(self, features: dict[str, Features], step: int = 0) -> dict[str, BridgeOutput]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, BridgeOutput], step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named parts to log); parts are detached tensors (``detached``), never Python numbers, so
        computing them never waits for the device."""
        raise NotImplementedError

    @classmethod
    def describe(cls, cfg: BridgeConfig) -> str:
        """One line for reports: what this bridge is with the settings ``cfg`` (a class method: a report describes a
        run from its config without building the model)."""
        return f"{cfg.name}: {cls.__name__}, embedding dim {cfg.embed_dim}"

    def discrete_space(self) -> DiscreteSpace | None:
        """The shared codes/tokens, or None for a bridge without a discrete space (no code analysis or usage)."""
        return None

    def affinity(self, query: str, q: Features, target: str, t: Features) -> torch.Tensor | None:
        """[B, Tq, Tt] similarity of every query position to every target position of the same pair (higher: more
        alike), the map localization draws; values at padded positions are ignored. None: not supported."""
        return None

    def retrieval_parts(self, output: BridgeOutput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(continuous [B, Ec], discrete [B, Ed]) of one modality's output, each L2-normalised, so that fused
        retrieval can score ``cont_a . cont_b + w disc_a . disc_b`` with a weight chosen on validation data
        (eval/fusion.py). None: the bridge has no discrete part to fuse."""
        return None

    def usage(self) -> dict[str, float]:
        """Usage statistics (``namespace/statistic[/modality or pair]``) of the training forwards since the last call,
        on this rank; forwards in eval mode are not counted, so an evaluation never leaks into the training log."""
        return {}

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters that must not get weight decay."""
        return {"logit_scale.log_scale"}

    def post_step(self) -> None:
        """Hook run after each optimizer step (clamps, schedules)."""
        self.logit_scale.post_step()

    def compile_hot_path(self, **options: Any) -> None:
        """Compile this bridge's training step in place: ``forward`` and ``loss`` each become one
        ``torch.compile(..., **options)`` graph. Every bridge's training forward and loss trace without a graph break
        and without a recompile per step (no host reads, usage counters as device tensors; tests/test_compile_clean.py),
        except SimVQ with dead-code restarts, the mm_ema / cross_commitment mask check and the codebook's k-means init
        (first training batch only), which read the host: with ``fullgraph=True`` run one step before compiling."""
        self.forward = torch.compile(self.forward, **options)
        self.loss = torch.compile(self.loss, **options)
