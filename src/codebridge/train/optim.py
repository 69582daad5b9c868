"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from codebridge.config import TrainConfig

# 2-D tables that encode position rather than content: decaying them towards zero only blurs positions.
POSITION_TABLES = ("positional_embedding", "temporal_embedding", "class_embedding")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay.

    Norm weights, biases and the logit scale are all 1-D or scalar (``ndim < 2``); positional tables are named in
    ``POSITION_TABLES``; the bridge adds its own through ``no_weight_decay()`` (names relative to ``model.bridge``).
    """
    names = {n for n, p in model.named_parameters() if p.ndim < 2 or n.rsplit(".", 1)[-1] in POSITION_TABLES}
    bridge = getattr(model, "bridge", None)
    if bridge is not None:
        names |= {f"bridge.{n}" for n in bridge.no_weight_decay()}
    return names


def lr_scales(model: nn.Module) -> dict[str, float]:
    """Parameter name -> multiple of ``train.lr``, from every submodule with an ``lr_scales()`` (pretrained towers:
    their ``lr_scale`` and layer-wise decay); the rest (new parameters) train at ``train.lr``."""
    scales: dict[str, float] = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "lr_scales"):
            scales |= {f"{prefix}.{n}" if prefix else n: s for n, s in module.lr_scales().items()}
    return scales


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: group 0 decays with ``cfg.weight_decay``, group 1 does not; parameters
    with another learning-rate scale (``lr_scales``) get groups of their own, named ``decay@SCALE``."""
    skip = no_decay_names(model)
    scales = lr_scales(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = skip - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_weight_decay() names unknown parameters: {', '.join(sorted(unknown))}")
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for key in [(False, 1.0), (True, 1.0)]:  # the two plain groups always come first
        groups[key] = {"params": [], "weight_decay": 0.0 if key[0] else cfg.weight_decay, "lr_scale": 1.0}
    for n, p in trainable:
        key = (n in skip, scales.get(n, 1.0))
        group = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if key[0] else cfg.weight_decay})
        group["lr_scale"] = key[1]
        group["params"].append(p)
    for (no_decay, scale), group in groups.items():
        group["name"] = ("no_decay" if no_decay else "decay") + ("" if scale == 1.0 else f"@{scale:.6g}")
    return torch.optim.AdamW(list(groups.values()), lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear from ``warmup_start_lr`` (step 0) to ``lr`` (step ``warmup_steps``), then a half cosine down to
    ``min_lr`` at step ``steps``; constant ``min_lr`` beyond.
    """
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    decay_steps = cfg.steps - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets every group's lr to ``lr_at(step)`` times its ``lr_scale``; its whole state is the step, so it resumes
    from two numbers.

    ``step()`` is called after each optimizer step, like torch's schedulers.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step_count, self.cfg) * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return lr_at(self.step_count, self.cfg)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
