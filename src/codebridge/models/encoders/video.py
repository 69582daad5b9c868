"""Video encoder: one ViT applied to every frame (shared weights), then a temporal transformer over frame vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codebridge.config import Config, num
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.image import VisionTransformer
from codebridge.models.encoders.layers import Transformer
from codebridge.models.features import Features


@dataclass
class VideoEncoderConfig:
    """``model.video``: the frames go through a ViT shaped by ``model.image`` (own weights), then these layers."""

    temporal_depth: int = num(1, ge=0)  # per-frame image encoder (ViT, own weights) + this many temporal layers
    heads: int = num(4, ge=1)  # of the temporal layers, which run at model.image.width


@ENCODERS.register("video", config=VideoEncoderConfig)
class VideoEncoder(nn.Module):
    """The ``video`` batch entry ({"frames": [B,T,3,S,S]}) -> Features(tokens = frames [B,T,D], summary = mean).

    The frame ViT has its own weights (shaped by model.image, sized by prep.video.size), shared across frames;
    temporal position embeddings cover prep.video.frames frames.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.frame_encoder = VisionTransformer(cfg.model.image, cfg.prep.video.size, where="prep.video.size")
        self.width = self.frame_encoder.width
        self.frames = cfg.prep.video.frames
        self.temporal_embedding = nn.Parameter(0.01 * torch.randn(self.frames, self.width))
        self.temporal = Transformer(self.width, cfg.model.video.temporal_depth, cfg.model.video.heads)
        self.ln_final = nn.LayerNorm(self.width)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame ViT summaries: [B,T,3,S,S] -> [B,T,D]."""
        b, t = frames.shape[:2]
        return self.frame_encoder(frames.flatten(0, 1)).summary.view(b, t, -1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        frames = inputs["frames"]
        if frames.shape[1] > self.frames:
            raise ValueError(
                f"video of {frames.shape[1]} frames is longer than prep.video.frames={self.frames}; "
                "preprocess with the model's video settings"
            )
        x = self.frame_features(frames) + self.temporal_embedding[: frames.shape[1]]  # [B,T,D]
        x = self.ln_final(self.temporal(x))
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return Features(tokens=x, mask=mask, summary=x.mean(1))
