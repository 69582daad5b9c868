"""Text encoder: a transformer over token ids with learned positions, padding-aware, optionally causal (CLIP)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codebridge.config import HEADS_DIVIDE_WIDTH, Config, broken, num
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.layers import Transformer, masked_mean
from codebridge.models.features import Features


@dataclass
class TextEncoderConfig:
    """``model.text``."""

    width: int = num(128, ge=1)
    depth: int = num(2, ge=1)
    heads: int = num(4, ge=1)
    mlp_ratio: float = num(4.0, gt=0)
    causal: bool = False  # CLIP's text tower is causal and summarises at EOT; default: masked mean

    def check(self) -> list[str]:
        return broken({HEADS_DIVIDE_WIDTH: self.width % self.heads == 0})


@ENCODERS.register("text", config=TextEncoderConfig)
class TextEncoder(nn.Module):
    """The ``text`` batch entry ({"ids": [B,L], "mask": [B,L]}, right-padded) -> Features.

    tokens = ``ln_final`` outputs with the batch mask; summary = their masked mean, or with ``causal`` the
    output at the last real token (the EOT token, as in CLIP). Padded positions never change the summary.
    ``vocab_size`` is the tokenizer's real size (``Tokenizer.vocab_size``); it defaults to ``prep.text.vocab_size``.
    """

    def __init__(self, cfg: Config, vocab_size: int | None = None) -> None:
        super().__init__()
        tcfg = cfg.model.text
        self.width = tcfg.width
        self.causal = tcfg.causal
        self.context_length = cfg.prep.text.context_length
        self.token_embedding = nn.Embedding(vocab_size or cfg.prep.text.vocab_size, tcfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(self.context_length, tcfg.width))
        self.transformer = Transformer(tcfg.width, tcfg.depth, tcfg.heads, tcfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(tcfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        ids, mask = inputs["ids"], inputs["mask"]  # [B,L], [B,L]
        if ids.shape[1] > self.context_length:
            raise ValueError(
                f"text of {ids.shape[1]} tokens is longer than prep.text.context_length={self.context_length}; "
                "tokenize with the model's tokenizer, which truncates to the context length"
            )
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]  # [B,L,D]
        x = self.ln_final(self.transformer(x, mask, causal=self.causal))
        if self.causal:
            last = (mask.sum(1) - 1).clamp(min=0)  # index of the EOT token in right-padded rows
            summary = x[torch.arange(x.shape[0], device=x.device), last]
        else:
            summary = masked_mean(x, mask)
        return Features(tokens=x, mask=mask, summary=summary)
