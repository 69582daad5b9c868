"""Is a model worth a checkpoint, and does a run look collapsed? One place for both judgements.

A finite loss does not make a good model: at ``train.lr=1e3`` the logit scale reaches 5e-43 while the loss is
still a number, and a checkpoint of that state resumes into the same dead end. So a checkpoint is *healthy* only
when every parameter and buffer is finite and the bridge's logit scale is at least ``MIN_LOGIT_SCALE``. A
*collapsed* run (the contrastive loss stuck at chance, ln of the batch) is legal but useless: it is warned about.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import nn

# Below 1 the softmax over a batch is nearly uniform whatever the embeddings: nothing is learned any more. The
# initial scale is 1/0.07 ~ 14.3 and the FDT clamp keeps it in [20, 403].
MIN_LOGIT_SCALE = 1.0
# The per-pair InfoNCE parts the bridges log (``pairwise_contrastive`` prefixes); chance level is ln(batch).
INFONCE_PREFIXES = ("loss/contrastive/", "loss/summary/", "loss/discrete/")
STUCK_WINDOWS = 3  # log windows in a row at chance before a run is called collapsed
STUCK_TOLERANCE = 0.01  # relative distance to ln(batch) that counts as "at chance"


def logit_scale(model: nn.Module) -> float | None:
    """The bridge's current logit scale (what the loss multiplies similarities by), or None without one."""
    scale = getattr(getattr(model, "bridge", None), "logit_scale", None)
    return float(scale()) if callable(scale) else None


@torch.no_grad()
def unhealthy(model: nn.Module) -> str | None:
    """Why ``model`` must not be checkpointed, or None when it is healthy."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return f"{name} has {bad} non-finite value(s)"
    scale = logit_scale(model)
    if scale is not None and not scale >= MIN_LOGIT_SCALE:
        return f"the logit scale collapsed to {scale:.3g} (below {MIN_LOGIT_SCALE:g}: similarities no longer matter)"
    return None


class CollapseWatch:
    """Fed every train log record; says (once, and again in the summary) when the run looks collapsed."""

    def __init__(self, global_batch: int) -> None:
        self.chance = math.log(global_batch)
        self._recent: deque[bool] = deque(maxlen=STUCK_WINDOWS)
        self.verdict: str | None = None

    def _at_chance(self, parts: dict[str, Any]) -> bool:
        infonce = [v for k, v in parts.items() if k.startswith(INFONCE_PREFIXES)]
        return bool(infonce) and all(abs(v - self.chance) <= STUCK_TOLERANCE * self.chance for v in infonce)

    def update(self, record: dict[str, Any]) -> str | None:
        """A one-line warning the first time the run looks collapsed, else None."""
        if self.verdict is not None or self.chance <= 0:
            return None
        parts = record["parts"]
        self._recent.append(self._at_chance(parts))
        scale = parts.get("logit_scale")
        if len(self._recent) == STUCK_WINDOWS and all(self._recent):
            self.verdict = (
                f"the contrastive loss has been at chance level ln({round(math.exp(self.chance))})="
                f"{self.chance:.3f} for {STUCK_WINDOWS} log windows up to step {record['step']}: the embeddings "
                "collapsed and the model learns nothing"
            )
        elif scale is not None and scale < MIN_LOGIT_SCALE:
            self.verdict = f"the logit scale fell to {scale:.3g} at step {record['step']}"
        if self.verdict is None:
            return None
        self.verdict += "; lower train.lr or raise train.warmup_steps and train again"
        return self.verdict
