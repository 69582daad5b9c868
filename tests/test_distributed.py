"""Two gloo processes train exactly like one process on the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from codebridge.config import Config, save_config
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.distributed import all_reduce_mean
from codebridge.models.model import CodeBridgeModel
from codebridge.train import train
from codebridge.train.parallel import average_gradients, barrier, init_distributed
from helpers import free_port
from test_trainer import one_thread, shapes, tiny_config  # noqa: F401  (fixtures)

BRIDGES = ("clip", "fdt")
BATCH = 8  # global; each of the two ranks takes 4 rows


def fixed_batch(vocab_size: int, context_length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, context_length + 1, (BATCH,), generator=g)
    mask = torch.arange(context_length)[None] < lengths[:, None]
    ids = torch.randint(4, vocab_size, (BATCH, context_length), generator=g) * mask
    pixels = torch.rand(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    return {"index": torch.arange(BATCH), "image": {"pixels": pixels}, "text": {"ids": ids, "mask": mask}}


def rows(batch: dict, part: slice) -> dict:
    return {k: rows(v, part) if isinstance(v, dict) else v[part] for k, v in batch.items()}


def loss_and_grads(model_dir: Path, batch: dict) -> dict[str, torch.Tensor]:
    """Loss (averaged over ranks) and gradients (averaged by the trainer's all-reduce) of one step in float64."""
    model = CodeBridgeModel.load(model_dir).double().train()
    loss, _ = model.loss(batch, step=0)
    loss.backward()
    average_gradients(model)
    grads = {f"grad/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": all_reduce_mean(loss.detach()), **grads}


def save_models(tmp_path: Path) -> tuple[list[Path], dict]:
    cfg = Config()
    cfg.prep.image.size, cfg.prep.text.context_length, cfg.prep.text.vocab_size = 16, 8, 300
    cfg.model.image.width = cfg.model.text.width = 32
    cfg.model.image.depth = cfg.model.text.depth = 1
    cfg.model.bridge.embed_dim = 32
    cfg.model.bridge.fdt.num_tokens, cfg.model.bridge.fdt.dim, cfg.model.bridge.fdt.temperature = 64, 32, 1.0
    tokenizer = Tokenizer.train(["a red circle", "a blue square", "green triangles"], cfg.prep.text)
    dirs = []
    for name in BRIDGES:
        cfg.model.bridge.name = name
        torch.manual_seed(0)
        dirs.append(CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, tokenizer)).save(tmp_path / name))
    return dirs, fixed_batch(tokenizer.vocab_size, cfg.prep.text.context_length)


def _worker(rank: int, world: int, init_file: str, dirs: list[Path], batch: dict, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = BATCH // world
        for model_dir in dirs:
            result = loss_and_grads(model_dir, rows(batch, slice(rank * share, (rank + 1) * share)))
            if rank == 0:
                save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"{model_dir.name}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_on_the_concatenated_batch(tmp_path: Path) -> None:
    dirs, batch = save_models(tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), dirs, batch, tmp_path), nprocs=2, join=True)
    for model_dir in dirs:
        single = loss_and_grads(model_dir, batch)
        double = load_file(tmp_path / f"{model_dir.name}.safetensors")
        assert single.keys() == double.keys(), model_dir.name
        assert len(single) > 10
        for name, value in single.items():
            torch.testing.assert_close(double[name], value, rtol=1e-5, atol=1e-8, msg=f"{model_dir.name} {name}")


def test_torchrun_matches_one_process_with_the_global_batch(shapes: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """``torchrun --nproc_per_node 2 -m codebridge train`` (batch 8 per rank) against one process with batch 16."""
    common = ("train.steps=6", "train.log_every=1", "train.checkpoint_every=3")
    single = train(tiny_config(shapes, tmp_path / "single", *common, "train.batch_size=16"))
    save_config(tiny_config(shapes, tmp_path / "double", *common, "train.batch_size=8"), tmp_path / "double.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "codebridge", "train", "--config", str(tmp_path / "double.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == "train"]

    double = tmp_path / "double"
    assert losses(double) == pytest.approx(losses(single), rel=1e-4)
    assert sorted(p.name for p in (double / "checkpoints" / "step_000006" / "rng").iterdir()) == [
        "rank_0.json",
        "rank_1.json",
    ]
    a, b = load_file(single / "model" / "model.safetensors"), load_file(double / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


def _frozen_rank_worker(rank: int, port: int, out: Path) -> None:
    """Rank 1 stops answering after the first barrier; rank 0 times how long its next barrier waits."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    init_distributed(timeout_minutes=0.1)
    barrier()
    if rank == 1:
        deadline = time.monotonic() + 120
        while not (out / "rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)  # no goodbye: the process group of a frozen run cannot be shut down cleanly
    start = time.monotonic()
    try:
        barrier()
        error = ""
    except RuntimeError as exc:
        error = str(exc)
    (out / "rank0.json").write_text(json.dumps({"seconds": time.monotonic() - start, "error": error}))
    os._exit(0)


def test_dist_timeout_bounds_the_wait_for_a_frozen_rank(tmp_path: Path) -> None:
    """train.dist_timeout_minutes reaches the process group: 6 s, not the former fixed 30 minutes."""
    mp.spawn(_frozen_rank_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"], "the barrier with a frozen rank returned"
    assert 4 < result["seconds"] < 60, result
