"""Activation checkpointing of the towers (``train.grad_checkpointing``): trade one more forward per block for the
activations a block would otherwise keep until the backward pass."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from codebridge.config import ConfigError
from codebridge.models.encoders.layers import Transformer


def checkpoint_blocks(tower: nn.Module) -> int:
    """Make every transformer stack of ``tower`` recompute its blocks in the backward pass; returns how many stacks.

    codebridge's own stacks (``layers.Transformer``) checkpoint each block; a ``transformers`` model uses its own
    switch (non-reentrant, like ours; it checkpoints only in train mode, so a locked tower is left as it is).
    """
    found = 0
    for module in tower.modules():
        if isinstance(module, Transformer):
            module.checkpointing = True
            found += 1
        elif getattr(module, "supports_gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            found += 1
    return found


def checkpoint_towers(encoders: nn.ModuleDict, modalities: Iterable[str]) -> None:
    """``checkpoint_blocks`` for each named modality's encoder; an encoder without blocks to checkpoint is refused."""
    for m in modalities:
        if not checkpoint_blocks(encoders[m]):
            raise ConfigError(
                f"train.grad_checkpointing: the {m} encoder ({type(encoders[m]).__name__}) has no transformer blocks "
                f"to checkpoint (neither codebridge's layers.Transformer nor a transformers model); remove {m!r}"
            )
