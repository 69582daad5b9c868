"""Pretrained image towers from ``transformers``: ViT and the CLIP/SigLIP vision towers, selected with
``model.image: {encoder: hf-vision, path: ...}``; ``prep.image`` size, mean and std come from the checkpoint.
hf_video.py runs the same tower on every frame of a clip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from codebridge.config import Config
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.layers import masked_mean
from codebridge.models.encoders.pretrained import (
    PREPROCESSOR_FILE,
    PretrainedConfig,
    PretrainedTower,
    adopt_prep,
    check_layer,
    load_tower,
    require_prep,
    resolve,
)
from codebridge.models.features import Features

SUMMARISED_BY_POOLER = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")  # auto pooling: pooler_output


def _classes() -> dict[str, Any]:
    from transformers import CLIPVisionModel, SiglipVisionModel

    return {
        "clip": CLIPVisionModel,
        "clip_vision_model": CLIPVisionModel,
        "siglip": SiglipVisionModel,
        "siglip_vision_model": SiglipVisionModel,
    }


def checkpoint_prep(folder: Path) -> tuple[dict[str, Any], str]:
    """The preprocessing the checkpoint was trained with: ``size`` from its config (the position table fixes
    it), ``mean``/``std`` from its ``preprocessor_config.json`` when it has one; and where they come from."""
    config = json.loads((folder / "config.json").read_text())
    config = config.get("vision_config", config)
    wanted: dict[str, Any] = {"size": int(config.get("image_size", 224))}
    source = f"{folder / 'config.json'}"
    processor = folder / PREPROCESSOR_FILE
    if processor.is_file():
        values = json.loads(processor.read_text())
        if "image_mean" in values and "image_std" in values:
            wanted |= {"mean": tuple(map(float, values["image_mean"])), "std": tuple(map(float, values["image_std"]))}
            source += f", {processor}"
    return wanted, source


@dataclass
class HFVisionConfig(PretrainedConfig):
    """``model.image`` with ``encoder: hf-vision``."""

    encoder: str = "hf-vision"
    modalities: ClassVar[tuple[str, ...]] = ("image",)


@ENCODERS.register("hf-vision", config=HFVisionConfig)
class HFVisionEncoder(PretrainedTower):
    """The ``image`` batch entry ({"pixels": [B,3,S,S]}) -> Features: tokens = the patch positions of the chosen
    layer (class/register tokens dropped), all valid; summary = the pooler output (CLIP/SigLIP), the class token
    (``cls``, ViT's auto) or the mean of the patches."""

    modality: ClassVar[str] = "image"  # whose config section and prep the tower takes

    def __init__(self, cfg: Config) -> None:
        m = self.modality
        section: PretrainedConfig = getattr(cfg.model, m)
        folder = resolve(section.path, f"model.{m}.path")
        require_prep(cfg, m, *checkpoint_prep(folder))
        model = load_tower(folder, _classes(), "vision_config", f"model.{m}.path")
        super().__init__(section, folder, model, model.config.hidden_size)
        check_layer(section, self.depth, f"model.{m}")
        self.model_type = model.config.model_type
        self.patches = (model.config.image_size // model.config.patch_size) ** 2

    @classmethod
    def adopt(cls, cfg: Config, modality: str, folder: Path) -> None:
        adopt_prep(cfg, modality, *checkpoint_prep(folder))

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        return self.encode_pixels(inputs["pixels"])

    def encode_pixels(self, pixels: torch.Tensor) -> Features:
        """[B,3,S,S] normalised pixels -> the Features of each image."""
        pooling = self.section.pooling
        if pooling == "auto":
            pooling = "pooler" if self.model_type in SUMMARISED_BY_POOLER else "cls"
        out = self.hf(pixel_values=pixels, output_hidden_states=self.section.layer != -1)
        x = self.hidden(out)
        tokens = x[:, x.shape[1] - self.patches :]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if pooling == "cls":
            summary = x[:, 0]
        elif pooling in ("mean", "last"):
            summary = masked_mean(tokens, mask) if pooling == "mean" else tokens[:, -1]
        else:
            summary = out.pooler_output
        return Features(tokens=tokens, mask=mask, summary=summary)
