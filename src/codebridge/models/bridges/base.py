"""What every bridge shares: the registry, the learnable logit scale and the symmetric InfoNCE over ranks."""

from __future__ import annotations

import itertools
import math

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


class Bridge(nn.Module):
    """Base class: subclasses map encoder ``Features`` to ``BridgeOutput`` and define the training loss."""

    def __init__(self, cfg: BridgeConfig, widths: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.widths = dict(widths)
        self.logit_scale = LogitScale(cfg)

    def forward(self, features: dict[str, Features], step: int = 0) -> dict[str, BridgeOutput]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, BridgeOutput], step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters that must not get weight decay."""
        return {"logit_scale.log_scale"}

    def post_step(self) -> None:
        """Hook run after each optimizer step (clamps, schedules)."""
        self.logit_scale.post_step()

    def usage_stats(self) -> dict[str, float]:
        """Code/token usage statistics accumulated since the last call (discrete bridges)."""
        return {}
