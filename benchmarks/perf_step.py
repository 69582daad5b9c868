"""(a) Training-step time of each bridge with identical encoders and batch; (c) model FLOPs utilisation of the step.

A step is what ``Trainer._step`` does for one micro-batch on one process: zero the gradients, ``model.loss``,
backward, clip the gradient norm, the AdamW step (``train/optim.py``), the schedule step and ``bridge.post_step``.
The bridges' models share one set of encoder modules, so their encoders are identical by construction and the
machine holds one copy of the encoder weights (each model keeps its own optimizer state).

What a bridge adds is nearly fixed per sample (FDT: T*C*d multiply-adds per input), while the encoders' cost
grows with their size, so the step ratio is only meaningful at a stated encoder size: the paper-scale preset uses
ViT-B-sized towers (image: width 768, depth 12; text: width 512, depth 12) on 32 px images in 4 px patches
(65 positions) and 16-token captions, with the discrete bridges at the papers' sizes (C = 16384, d = 512; K = 1024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from codebridge.config import Config, load_config
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.models.model import CodeBridgeModel
from codebridge.train.optim import WarmupCosine, build_optimizer
from codebridge.train.parallel import GradientSync
from perf_measure import count_flops, interleaved_times, median

BRIDGES = ("clip", "codebook", "fdt")
MODALITIES = ["image", "text"]

PAPER_SCALE = [
    "prep.image.size=32",
    "model.image.patch_size=4",
    "model.image.width=768",
    "model.image.depth=12",
    "model.image.heads=12",
    "prep.text.context_length=16",
    "model.text.width=512",
    "model.text.depth=12",
    "model.text.heads=8",
    "model.bridge.embed_dim=512",
    "model.bridge.codebook.size=1024",
    "model.bridge.fdt.num_tokens=16384",
    "model.bridge.fdt.dim=512",
    "model.bridge.fdt.chunk_size=8",
]
QUICK_SCALE = [
    *PAPER_SCALE,
    "model.image.width=384",
    "model.image.depth=6",
    "model.image.heads=6",
    "model.text.width=256",
    "model.text.depth=6",
    "model.text.heads=4",
]
WORDS = [
    "red",
    "green",
    "blue",
    "smiling",
    "face",
    "grinning",
    "cat",
    "dog",
    "heart",
    "star",
    "moon",
    "sun",
    "hand",
    "wave",
    "party",
    "tree",
    "car",
    "house",
]


@dataclass
class StepRun:
    """One bridge's model, optimizer, schedule and a fixed batch; calling it runs one training step."""

    model: CodeBridgeModel
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    batch: dict[str, Any]
    grad_clip: float
    step: int = 0
    sync: GradientSync | None = None  # how gradients meet over ranks (benchmarks/ddp_overlap.py); None: one process

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = (self.model if self.sync is None else self.sync).loss(self.batch, self.step)
        loss.backward()
        if self.sync is not None:
            self.sync.finish()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.model.bridge.post_step()
        self.step += 1


def synthetic_captions(n: int, seed: int) -> list[str]:
    """Captions of 2 to 20 words (so some fill the context and some are padded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 21, (n,), generator=g).tolist()
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)) for k in lengths]


def tokenizer_for(cfg: Config) -> Tokenizer:
    return Tokenizer.train(synthetic_captions(2000, seed=1), cfg.prep.text)


def synthetic_batch(cfg: Config, tokenizer: Tokenizer, size: int, device: torch.device) -> dict[str, Any]:
    """A batch in the collate contract as the training loader delivers it: random uint8 pixels with jitter factors
    (the model finishes them on its device, inside the timed step) and tokenized random captions."""
    g = torch.Generator().manual_seed(2)
    side = cfg.prep.image.size
    ids, mask = tokenizer.encode(synthetic_captions(size, seed=3))
    batch = {
        "index": torch.arange(size),
        "labels": {},
        "image": {
            "pixels": torch.randint(0, 256, (size, 3, side, side), dtype=torch.uint8, generator=g),
            "jitter": 0.8 + 0.4 * torch.rand(size, 3, generator=g),
        },
        "text": {"ids": ids, "mask": mask},
    }
    return _to(batch, device)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device)


def build_runs(
    recipe: str | None, overrides: list[str], bridges: tuple[str, ...], device: torch.device
) -> dict[str, StepRun]:
    """One StepRun per bridge (recipe + overrides, batch of ``train.batch_size``); every model after the first
    reuses the first one's encoder modules."""
    runs: dict[str, StepRun] = {}
    tokenizer = None
    batch = None
    for name in bridges:
        cfg = load_config(recipe, [*overrides, f"model.bridge.name={name}"])
        tokenizer = tokenizer or tokenizer_for(cfg)
        torch.manual_seed(cfg.seed)
        model = CodeBridgeModel(cfg, MODALITIES, Preprocessors(cfg.prep, tokenizer))
        if runs:
            model.encoders = next(iter(runs.values())).model.encoders
        model = model.to(device).train()
        optimizer = build_optimizer(model, cfg.train)
        batch = batch or synthetic_batch(cfg, tokenizer, cfg.train.batch_size, device)
        runs[name] = StepRun(model, optimizer, WarmupCosine(optimizer, cfg.train), batch, cfg.train.grad_clip)
    return runs


def time_steps(runs: dict[str, StepRun], device: torch.device, repeats: int) -> dict[str, Any]:
    """FLOPs of each step (counted in a first step), then one untimed round and ``repeats`` interleaved timings."""
    flops = {name: count_flops(run) for name, run in runs.items()}
    times = interleaved_times(dict(runs), device, repeats, warmup=1)
    return {
        "batch_size": len(next(iter(runs.values())).batch["index"]),
        "flops": flops,
        "seconds": times,
        "seconds_median": {name: median(t) for name, t in times.items()},
        "parameters": {name: sum(p.numel() for p in run.model.parameters()) for name, run in runs.items()},
    }


def step_figures(steps: dict[str, Any], matmul_flops: float) -> dict[str, Any]:
    """Ratios to clip, samples/s and model FLOPs utilisation of every bridge's step."""
    seconds = steps["seconds_median"]
    out: dict[str, Any] = {
        "ratio_to_clip": {name: s / seconds["clip"] for name, s in seconds.items()},
        "samples_per_s": {name: steps["batch_size"] / s for name, s in seconds.items()},
        "flops_per_s": {name: steps["flops"][name] / s for name, s in seconds.items()},
    }
    out["mfu"] = {name: f / matmul_flops for name, f in out["flops_per_s"].items()}
    return out


def run_steps(
    recipe: str | None, overrides: list[str], bridges: tuple[str, ...], device: torch.device, repeats: int
) -> dict[str, Any]:
    """Build, count and time the steps; the models are freed on return."""
    return time_steps(build_runs(recipe, overrides, bridges, device), device, repeats)
