"""Which config changes a resume may carry: checked against the checkpoint's own config before anything is written.

A field that shapes the model, the data stream or the optimizer state cannot change under a checkpoint (the weights
would not load, or the run would silently become another one): such a resume is refused, naming every differing
field. The fields in ``SAFE`` only steer how the rest of the run goes and are accepted with a logged note.
docs/training.md lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codebridge.config import Config, ConfigError, load_config, to_dict
from codebridge.train.checkpoint import CONFIG_FILE

# Dotted names, or prefixes ending in "." for whole sections.
SAFE = (
    "name",
    "output_dir",  # resuming another run's checkpoint into a new folder
    "train.steps",  # reshapes the remaining cosine
    "train.max_minutes",
    "train.lr",  # the documented fixes after a divergence: lower lr, longer warmup, clipping, fp32
    "train.min_lr",
    "train.warmup_steps",
    "train.warmup_start_lr",
    "train.grad_clip",
    "train.precision",
    "train.compile",  # speed only: the same numbers within float rounding
    "train.grad_checkpointing",  # recomputes the same activations
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress",
    "data.val",
    "data.root",  # the built-in data moved
    "data.skip_bad",
    "data.num_workers",
    "data.cache_mb",
    "data.prefetch",
    "eval.",
)


def is_safe(field: str) -> bool:
    return any(field == s or (s.endswith(".") and field.startswith(s)) for s in SAFE)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def checkpoint_config(checkpoint: Path) -> tuple[Path, Config]:
    """The config a checkpoint was written with: its own copy, else (older checkpoints) the run folder's."""
    for path in (checkpoint / CONFIG_FILE, checkpoint.parent.parent / CONFIG_FILE):
        if path.is_file():
            try:
                return path, load_config(path)
            except ConfigError as exc:
                raise ConfigError(f"cannot compare with the checkpoint's config: {exc}") from None
    raise ConfigError(
        f"{checkpoint} has no {CONFIG_FILE} (nor its run folder), so this resume cannot be checked; "
        f"put the run's config at {checkpoint / CONFIG_FILE}"
    )


def check_resume(checkpoint: Path, cfg: Config) -> str | None:
    """Refuse a resume whose config changes an unsafe field; return a note listing the safe changes. Reads only."""
    source, old_cfg = checkpoint_config(checkpoint)
    old, new = flatten(to_dict(old_cfg)), flatten(to_dict(cfg))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    unsafe = [k for k in changed if not is_safe(k)]
    if unsafe:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in unsafe)
        raise ConfigError(
            f"cannot resume from {checkpoint}: {shown} would change the model, the data stream or the optimizer "
            f"state of the run it continues (config {source}); resume with the same values (e.g. --config {source}), "
            "or start a new run in another output_dir"
        )
    if not changed:
        return None
    return "resuming with changed settings: " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
