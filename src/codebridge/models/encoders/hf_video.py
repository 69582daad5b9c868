"""Pretrained per-frame video towers: a ``transformers`` image tower (ViT, CLIP/SigLIP vision; hf_vision.py) run on
every frame, selected with ``model.video: {encoder: hf-video, path: ...}``; ``prep.video`` size, mean and std come
from the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.hf_vision import HFVisionEncoder
from codebridge.models.encoders.layers import masked_mean
from codebridge.models.encoders.pretrained import PretrainedConfig
from codebridge.models.features import Features


@dataclass
class HFVideoConfig(PretrainedConfig):
    """``model.video`` with ``encoder: hf-video``; ``pooling`` makes each frame's vector (as hf-vision's summary)."""

    encoder: str = "hf-video"
    modalities: ClassVar[tuple[str, ...]] = ("video",)


@ENCODERS.register("hf-video", config=HFVideoConfig)
class HFVideoEncoder(HFVisionEncoder):
    """The ``video`` batch entry ({"frames": [B,T,3,S,S]}) -> Features: tokens = one vector per frame (the image
    tower's summary of it: frames are video's positions, as for the scratch video encoder), all valid; summary =
    their masked mean. No temporal layers: the tower's weights are all there is."""

    modality: ClassVar[str] = "video"

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        frames = inputs["frames"]
        b, t = frames.shape[:2]
        tokens = self.encode_pixels(frames.flatten(0, 1)).summary.view(b, t, -1)
        mask = torch.ones(b, t, dtype=torch.bool, device=tokens.device)
        return Features(tokens=tokens, mask=mask, summary=masked_mean(tokens, mask))
