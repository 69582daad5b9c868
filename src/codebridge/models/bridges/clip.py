"""The continuous CLIP baseline: a linear projection of each summary, L2-normalised, symmetric InfoNCE per pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codebridge.config import BridgeConfig
from codebridge.models.bridges.base import BRIDGES, Bridge, detached, pairwise_contrastive
from codebridge.models.features import BridgeOutput, Features


@BRIDGES.register("clip")
class ClipBridge(Bridge):
    """embedding = normalize(summary @ W_modality) with W: [D_modality, embed_dim], no bias; no extras."""

    def __init__(self, cfg: BridgeConfig, widths: dict[str, int]) -> None:
        super().__init__(cfg, widths)
        self.proj = nn.ModuleDict({m: nn.Linear(w, cfg.embed_dim, bias=False) for m, w in widths.items()})
        for m, w in widths.items():
            nn.init.normal_(self.proj[m].weight, std=w**-0.5)  # CLIP's projection init

    def forward(self, features: dict[str, Features], step: int = 0) -> dict[str, BridgeOutput]:
        return {m: BridgeOutput(F.normalize(self.proj[m](f.summary), dim=-1)) for m, f in features.items()}

    def loss(self, outputs: dict[str, BridgeOutput], step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the symmetric InfoNCE over every present modality pair (three modalities: three pairs)."""
        scale = self.logit_scale()
        embeddings = {m: out.embedding for m, out in outputs.items()}
        total, parts = pairwise_contrastive(embeddings, scale, self.cfg.margin, prefix="loss/contrastive")
        return total, detached(parts | {"logit_scale": scale})

    @classmethod
    def describe(cls, cfg: BridgeConfig) -> str:
        return f"clip: continuous baseline, embedding dim {cfg.embed_dim}"

    def affinity(self, query: str, q: Features, target: str, t: Features) -> torch.Tensor:
        """Cosine of the positions' tokens after each modality's summary projection: there is no fine-grained shared
        space, so this is a baseline (image patches are not what the projection was trained on)."""
        eq, et = F.normalize(self.proj[query](q.tokens), dim=-1), F.normalize(self.proj[target](t.tokens), dim=-1)
        return eq @ et.transpose(1, 2)
