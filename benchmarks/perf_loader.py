"""(d) Loader throughput: ``training_loader`` (the trainer's own) over a data spec, decoded-input cache warm.

The first epoch decodes every file and fills the cache; the second is timed. The loader settings (batch size,
workers, cache, preprocessing with its train-time augmentation) are the recipe's, so the figure is what that
recipe's training loop gets: uint8 pictures and jitter factors (the normalisation runs in the step, on the
model's device). On CUDA the batches are pinned and copied to the GPU as the trainer does (``to_device``,
non-blocking), and the epoch ends with a synchronisation.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from codebridge.config import load_config
from codebridge.data.dataset import all_texts, training_loader
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.data.sources import open_source
from codebridge.train.trainer import to_device


def _epoch(loader: Any, device: torch.device) -> tuple[int, float]:
    """(samples, seconds) of one pass over the loader, each batch delivered onto ``device``."""
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(to_device(batch, device)["index"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return samples, time.perf_counter() - start


def run_loader(recipe: str, overrides: list[str], device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cpu")
    cfg = load_config(recipe, overrides)
    samples = open_source(cfg.data.train, cfg.data)
    prep = Preprocessors(cfg.prep, Tokenizer.train(all_texts(samples), cfg.prep.text))
    loader = training_loader(cfg, samples, prep, pin_memory=device.type == "cuda")
    cold_samples, cold_seconds = _epoch(loader, device)
    warm_samples, warm_seconds = _epoch(loader, device)
    return {
        "spec": cfg.data.train,
        "modalities": cfg.data.modalities,
        "items": len(samples),
        "batch_size": cfg.train.batch_size,
        "num_workers": cfg.data.num_workers,
        "prefetch": cfg.data.prefetch,
        "pin_memory": device.type == "cuda",
        "pixels": "uint8",  # the device finishes them (before this field: float, normalised in the loader)
        "cache_mb": cfg.data.cache_mb,
        "cold_epoch": {"samples": cold_samples, "seconds": cold_seconds},
        "warm_epoch": {"samples": warm_samples, "seconds": warm_seconds},
        "samples_per_s": warm_samples / warm_seconds,
    }
