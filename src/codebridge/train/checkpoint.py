"""Atomic, pickle-free training checkpoints: ``RUN/checkpoints/step_000200/`` and a ``latest`` pointer.

Layout of one checkpoint::

    model.safetensors       parameters and buffers
    optimizer.safetensors   every tensor of the optimizer state ("<param index>.<name>")
    optimizer.json          param groups and non-tensor state
    trainer.json            step, data position (rank 0), scheduler state, world size
    rng/rank_<r>.json       Python/NumPy/torch/CUDA generator states of rank r
    data/rank_<r>.json      the data position of rank r (ranks can differ when data.skip_bad leaves batches out;
                            streamed shards add their per-worker position, see data/stream.py)
    tokenizer/              the BPE tokenizer (text runs)
    config.yaml             the resolved config of the run (a resume is checked against it)

Everything is written (and fsynced) into ``.tmp_step_000200`` and renamed when complete; ``latest`` is replaced
(atomically) only afterwards, so a run killed at any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from codebridge.config import ConfigError, save_config
from codebridge.distributed import rank, world_size
from codebridge.files import atomic_path, atomic_write_json, atomic_write_text, naming_errors
from codebridge.train.optim import WarmupCosine
from codebridge.train.parallel import barrier, load_model_state, load_optimizer_state, model_state, optimizer_state
from codebridge.train.rng import capture_rng, restore_rng

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PREFIX = "step_"
TOKENIZER_DIR = "tokenizer"
CONFIG_FILE = "config.yaml"


class Saveable(Protocol):
    def save(self, directory: str | Path) -> None: ...


@dataclass
class TrainState:
    """Where training stands after ``step`` optimizer steps; enough to continue the data stream exactly."""

    step: int = 0  # optimizer steps done
    batches: int = 0  # loader batches consumed since the start, all-bad ones included (the loader's ``start_step``)
    epoch: int = 0  # for the logs; the loader derives it from ``batches``
    samples_seen: int = 0  # over all ranks
    world_size: int = 1
    stream: dict[str, Any] = field(default_factory=dict)  # streamed shards: ``StreamLoader.state()`` of this rank


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=1)


def _save_optimizer(sd: dict[str, Any], directory: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, param_state in sd["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    with atomic_path(directory / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    _write_json(directory / "optimizer.json", {"param_groups": sd["param_groups"], "scalars": scalars})


def _load_optimizer(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    flat = {**load_file(str(directory / "optimizer.safetensors")), **meta["scalars"]}
    for name, value in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupCosine,
    tokenizer: Saveable | None = None,
    keep: int = 2,
    config: Any = None,
) -> Path:
    """Write the checkpoint of ``state.step`` (collective: every rank calls it and writes its RNG state).

    ``config`` (the run's ``Config``) is saved with it, so a resume can be checked against what it continues.

    Keeps the newest ``keep`` checkpoints (``keep < 1``: all). Returns the checkpoint folder.
    """
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp_{final.name}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        (tmp / "data").mkdir()
    barrier()
    _write_json(tmp / "rng" / f"rank_{rank()}.json", capture_rng())
    _write_json(tmp / "data" / f"rank_{rank()}.json", {"batches": state.batches, "stream": state.stream})
    weights, optimizer_sd = model_state(model), optimizer_state(model, optimizer)  # full, even when sharded
    barrier()
    if rank() == 0:
        with atomic_path(tmp / "model.safetensors") as path:
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})
        _save_optimizer(optimizer_sd, tmp)
        if config is not None:
            save_config(config, tmp / CONFIG_FILE)
        _write_json(tmp / "trainer.json", {"state": asdict(state), "scheduler": scheduler.state_dict()})
        if tokenizer is not None:
            with naming_errors(tmp / TOKENIZER_DIR):
                tokenizer.save(tmp / TOKENIZER_DIR)
        shutil.rmtree(final, ignore_errors=True)  # a stale copy of this step from a killed run
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep < 1:
        return
    steps = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old)


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """``resume`` is "latest" (this run's newest checkpoint), a checkpoint folder, or another run's folder."""
    where = run_dir if resume == LATEST else Path(resume)
    pointer = where / CHECKPOINTS / LATEST
    if pointer.is_file():
        where = where / CHECKPOINTS / pointer.read_text().strip()
    if not (where / "trainer.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {where} (resume={resume!r}); pass 'latest' with the run's config, "
            f"a folder RUN/{CHECKPOINTS}/{PREFIX}NNNNNN, or a run folder that has {CHECKPOINTS}/{LATEST}"
        )
    return where


def check_world_size(path: Path) -> None:
    """Refuse a checkpoint written by another number of processes (its data stream and RNG states differ)."""
    written = json.loads((path / "trainer.json").read_text())["state"]["world_size"]
    if written != world_size():
        raise ConfigError(
            f"{path} was written by {written} process(es) but this run has {world_size()}; "
            f"resume with the same torchrun --nproc_per_node so the data stream and RNG states line up"
        )


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: WarmupCosine
) -> TrainState:
    """Restore weights, optimizer and schedule in place and return the data position (RNG: ``load_rng``)."""
    meta = json.loads((path / "trainer.json").read_text())
    state = TrainState(**meta["state"])
    check_world_size(path)
    own_position = path / "data" / f"rank_{rank()}.json"
    if own_position.is_file():  # checkpoints before per-rank positions hold rank 0's only
        own = json.loads(own_position.read_text())
        state.batches, state.stream = own["batches"], own.get("stream", {})
    device = str(next(model.parameters()).device)
    load_model_state(model, load_file(str(path / "model.safetensors"), device=device))
    load_optimizer_state(model, optimizer, _load_optimizer(path))
    scheduler.load_state_dict(meta["scheduler"])
    return state


def load_rng(path: Path) -> None:
    """Restore this rank's generators; call it last, right before the first resumed step."""
    restore_rng(json.loads((path / "rng" / f"rank_{rank()}.json").read_text()))
