"""(d) Loader throughput: ``training_loader`` (the trainer's own) over a data spec, decoded-input cache warm.

The first epoch decodes every file and fills the cache; the second is timed. The loader settings (batch size,
workers, cache, preprocessing with its train-time augmentation) are the recipe's, so the figure is what that
recipe's training loop gets.
"""

from __future__ import annotations

import time
from typing import Any

from codebridge.config import load_config
from codebridge.data.dataset import all_texts, training_loader
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.data.sources import open_source


def _epoch(loader: Any) -> tuple[int, float]:
    """(samples, seconds) of one pass over the loader."""
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch["index"])
    return samples, time.perf_counter() - start


def run_loader(recipe: str, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(recipe, overrides)
    samples = open_source(cfg.data.train, cfg.data)
    prep = Preprocessors(cfg.prep, Tokenizer.train(all_texts(samples), cfg.prep.text))
    loader = training_loader(cfg, samples, prep)
    cold_samples, cold_seconds = _epoch(loader)
    warm_samples, warm_seconds = _epoch(loader)
    return {
        "spec": cfg.data.train,
        "modalities": cfg.data.modalities,
        "items": len(samples),
        "batch_size": cfg.train.batch_size,
        "num_workers": cfg.data.num_workers,
        "cache_mb": cfg.data.cache_mb,
        "cold_epoch": {"samples": cold_samples, "seconds": cold_seconds},
        "warm_epoch": {"samples": warm_samples, "seconds": warm_seconds},
        "samples_per_s": warm_samples / warm_seconds,
    }
