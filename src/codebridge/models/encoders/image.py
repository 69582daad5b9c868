"""Image encoder: a CLIP-style Vision Transformer (patch conv, CLS token, learned positions, pre-norm blocks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codebridge.config import HEADS_DIVIDE_WIDTH, Config, ConfigError, broken, num
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.layers import Transformer
from codebridge.models.features import Features


@dataclass
class ImageEncoderConfig:
    """``model.image``; also shapes the per-frame ViT of the video encoder."""

    patch_size: int = num(4, ge=1)
    width: int = num(128, ge=1)
    depth: int = num(4, ge=1)
    heads: int = num(4, ge=1)
    mlp_ratio: float = num(4.0, gt=0)
    freeze_patch_embed: bool = False  # FDT freezes the ViT patch embedding (conv1)
    # None: global attention. r: a patch attends only to the patches within r rows and columns of it (never to CLS),
    # so after `depth` blocks it sees a (2 r depth + 1)^2 neighbourhood and its token stays about its own place;
    # CLS still attends to every patch, so the summary stays global (docs/localization.md, local patch tokens)
    attention_radius: int | None = num(None, ge=0)

    def check(self) -> list[str]:
        return broken({HEADS_DIVIDE_WIDTH: self.width % self.heads == 0})


class VisionTransformer(nn.Module):
    """ViT over square images of ``image_size`` pixels; also the per-frame encoder of the video tower.

    tokens = patch outputs of the last block *before* ``ln_post`` (FDT grounds its tokens there), all valid;
    summary = ``ln_post`` of the CLS output.
    """

    def __init__(self, cfg: ImageEncoderConfig, image_size: int, where: str = "prep.image.size") -> None:
        super().__init__()
        if image_size % cfg.patch_size:
            raise ConfigError(
                f"{where}={image_size} is not a multiple of model.image.patch_size={cfg.patch_size}; "
                "change one of them so the patches tile the image"
            )
        self.width = cfg.width
        self.grid = image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = cfg.width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.conv1.requires_grad_(not cfg.freeze_patch_embed)
        allowed = None if cfg.attention_radius is None else local_attention(self.grid, cfg.attention_radius)
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, pixels: torch.Tensor) -> Features:
        """pixels: [B,3,S,S] -> Features(tokens [B,N,D] with N = (S/patch)^2, summary [B,D])."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B,N,D]
        if x.shape[1] != self.grid**2:
            raise ValueError(
                f"images of {tuple(pixels.shape[-2:])} px give {x.shape[1]} patches, but this ViT was built for "
                f"{self.grid}x{self.grid}; preprocess with the size the model was configured with"
            )
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)  # [B,1,D]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # [B,1+N,D]
        x = self.transformer(self.ln_pre(x), allowed=self.allowed)
        tokens = x[:, 1:]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Features(tokens=tokens, mask=mask, summary=self.ln_post(x[:, 0]))


def local_attention(grid: int, radius: int) -> torch.Tensor:
    """[1, 1, 1+G*G, 1+G*G] bool attention mask (True = may attend) over CLS + a row-major G x G patch grid: CLS
    attends to everything; a patch to the patches at most ``radius`` rows and columns away, itself included, and not
    to CLS (which would bring the whole image back into every patch)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    r, c = rows.flatten(), cols.flatten()
    near = ((r[:, None] - r[None]).abs() <= radius) & ((c[:, None] - c[None]).abs() <= radius)
    allowed = torch.ones(1 + grid * grid, 1 + grid * grid, dtype=torch.bool)
    allowed[1:, 1:] = near
    allowed[1:, 0] = False
    return allowed[None, None]


@ENCODERS.register("image", config=ImageEncoderConfig)
class ImageEncoder(nn.Module):
    """The ``image`` batch entry ({"pixels": [B,3,S,S]}) through a ViT sized by model.image and prep.image.size."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.vit = VisionTransformer(cfg.model.image, cfg.prep.image.size)
        self.width = self.vit.width

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        return self.vit(inputs["pixels"])
