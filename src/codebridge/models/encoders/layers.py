"""Transformer pieces shared by every encoder: pre-norm blocks over torch's scaled_dot_product_attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention; ``allowed`` [B or 1, 1, T or 1, T] is True where a query may look at a key."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}; pick heads that divide the width")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B,H,T,d/H]
        return self.out(attend(q, k, v, allowed).transpose(1, 2).reshape(b, t, d))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``scaled_dot_product_attention``; on a CPU, half-precision inputs are attended in fp32 and cast back.

    Why: torch's CPU attention kernels are slower in bf16 than in fp32 (forward + backward at the emoji recipes'
    shapes, 2 threads: 30 ms against 8 ms), which cancelled much of what bf16 autocast gains in the matmuls.
    """
    half = q.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
    if q.device.type != "cpu" or not half:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs straight back to bf16
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
    return y.to(q.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks; padded keys (``mask`` False) are never attended to.

    ``checkpointing`` (``train.grad_checkpointing``): while gradients are recorded, each block keeps only its input
    and recomputes its activations in the backward pass (less memory, one more forward per block).
    """

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B,T,D]; mask: [B,T] bool, True = real token; causal: each position sees only itself and the past;
        allowed: a fixed [1,1,T,T] bool pattern (True = may attend) combined with both."""
        allowed = attention_mask(mask, x.shape[1], causal, x.device, allowed)
        recompute = self.checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, allowed, use_reentrant=False) if recompute else block(x, allowed)
        return x


def attention_mask(
    mask: torch.Tensor | None,
    length: int,
    causal: bool,
    device: torch.device,
    pattern: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean SDPA mask (True = may attend) combining key padding [B,1,1,T], causality [1,1,T,T] and a fixed
    ``pattern`` [1,1,T,T] (e.g. local attention)."""
    allowed = pattern
    if mask is not None:
        allowed = mask[:, None, None, :] if allowed is None else allowed & mask[:, None, None, :]
        allowed = mask[:, None, None, :]
    if causal:
        tri = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B,T,D] over the positions where mask [B,T] is True (zero for an all-padding row)."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # [B,T,1]
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need": [length, width]."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: width // 2])
    return table
