"""Audio encoder: strided 1-D convolutions over log-mel frames, then a padding-aware transformer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from codebridge.config import HEADS_DIVIDE_WIDTH, Config, broken, num
from codebridge.data.modalities.audio import AudioPrep
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.layers import Transformer, masked_mean, sinusoidal_positions
from codebridge.models.features import Features


def max_frames(prep: AudioPrep) -> int:
    """Log-mel frames of the longest clip the preprocessing keeps (centred STFT: one frame per hop, plus one)."""
    return int(prep.max_seconds * prep.sample_rate) // prep.hop_length + 1


class ConvSubsample(nn.Module):
    """``stages`` stride-2 convolutions (kernel 3, GELU): [B,F,n_mels] -> [B,ceil(F/2^stages),width].

    Padded frames are zeroed before every convolution, so the real frames come out exactly as they would
    without the padding; the mask keeps every second frame per stage (a frame is real iff its centre is).
    """

    def __init__(self, n_mels: int, width: int, stages: int) -> None:
        super().__init__()
        strides = [2] * stages or [1]  # subsample 1: one stride-1 conv still maps n_mels to the width
        self.strides = strides
        self.convs = nn.ModuleList(
            nn.Conv1d(n_mels if i == 0 else width, width, kernel_size=3, stride=s, padding=1)
            for i, s in enumerate(strides)
        )
        self.act = nn.GELU()

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = mel.transpose(1, 2)  # [B,n_mels,F]
        for conv, stride in zip(self.convs, self.strides, strict=True):
            x = self.act(conv(x * mask[:, None, :].to(x.dtype)))
            mask = mask[:, ::stride]
        return x.transpose(1, 2), mask  # [B,F',D], [B,F']


@dataclass
class AudioEncoderConfig:
    """``model.audio``."""

    width: int = num(128, ge=1)
    depth: int = num(2, ge=1)
    heads: int = num(4, ge=1)
    mlp_ratio: float = num(4.0, gt=0)
    subsample: int = num(4, ge=1)  # time reduction of the convolutional front end (2 stride-2 convs)
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"  # learned: a table sized for prep.audio.max_seconds

    def check(self) -> list[str]:
        return broken(
            {
                HEADS_DIVIDE_WIDTH: self.width % self.heads == 0,
                "{subsample} must be a power of two (1, 2, 4, 8, ...)": self.subsample & (self.subsample - 1) == 0,
            }
        )


@ENCODERS.register("audio", config=AudioEncoderConfig)
class AudioEncoder(nn.Module):
    """The ``audio`` batch entry ({"mel": [B,F,n_mels], "mask": [B,F]}, right-padded) -> Features.

    tokens = subsampled frames after ``ln_final`` (mask downsampled from the input mask); summary = masked mean.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        acfg, prep = cfg.model.audio, cfg.prep.audio
        stages = round(math.log2(acfg.subsample))  # a power of two: AudioEncoderConfig.check
        self.width = acfg.width
        self.subsample = ConvSubsample(prep.n_mels, acfg.width, stages)
        self.max_frames = max_frames(prep)
        max_tokens = math.ceil(self.max_frames / acfg.subsample)
        if acfg.positions == "learned":
            self.positional_embedding = nn.Parameter(0.01 * torch.randn(max_tokens, acfg.width))
        else:
            self.register_buffer("positional_embedding", sinusoidal_positions(max_tokens, acfg.width), persistent=False)
        self.transformer = Transformer(acfg.width, acfg.depth, acfg.heads, acfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(acfg.width)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        if inputs["mel"].shape[1] > self.max_frames:
            raise ValueError(
                f"audio of {inputs['mel'].shape[1]} mel frames is longer than prep.audio.max_seconds allows "
                f"({self.max_frames}); preprocess with the model's audio settings, which crop long clips"
            )
        x, mask = self.subsample(inputs["mel"], inputs["mask"])  # [B,T,D], [B,T]
        x = self.ln_final(self.transformer(x + self.positional_embedding[: x.shape[1]], mask))
        return Features(tokens=x, mask=mask, summary=masked_mean(x, mask))
