"""Two gloo processes train exactly like one process on the concatenated batch, and keep identical state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from codebridge.config import Config, save_config
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.distributed import all_reduce_mean, rank, world_size
from codebridge.models.model import CodeBridgeModel
from codebridge.train import train
from codebridge.train.parallel import GradientSync, barrier, init_distributed, is_sharded, shutdown_distributed
from codebridge.train.trainer import Trainer
from helpers import free_port
from test_trainer import one_thread, shapes, tiny_config  # noqa: F401  (fixtures)

BRIDGES = ("clip", "codebook", "fdt")
MODES = ("overlap", "manual", "fsdp")  # fsdp: FSDP2 on the towers (train.shard), see loss_and_grads
BATCH = 8  # global; two micro-batches of 4 rows, each split between the two ranks
MICRO = 2


def fixed_batch(vocab_size: int, context_length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, context_length + 1, (BATCH,), generator=g)
    mask = torch.arange(context_length)[None] < lengths[:, None]
    ids = torch.randint(4, vocab_size, (BATCH, context_length), generator=g) * mask
    pixels = torch.rand(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    return {"index": torch.arange(BATCH), "image": {"pixels": pixels}, "text": {"ids": ids, "mask": mask}}


def rows(batch: dict, part: slice) -> dict:
    return {k: rows(v, part) if isinstance(v, dict) else v[part] for k, v in batch.items()}


def micro_batches(batch: dict, rank: int, world: int) -> list[dict]:
    """This rank's share of each micro-batch: micro-batch i is the global rows [i*4, i*4+4), split over ranks."""
    size = BATCH // MICRO
    share = size // world
    return [rows(batch, slice(i * size + rank * share, i * size + (rank + 1) * share)) for i in range(MICRO)]


def loss_and_grads(model_dir: Path, batches: list[dict], mode: str) -> dict[str, torch.Tensor]:
    """Loss (averaged over ranks) and gradients (synchronised as the trainer does) of one accumulated step, in
    float64."""
    model = CodeBridgeModel.load(model_dir).double().train()
    sync = GradientSync(
        model, "manual" if mode == "fsdp" else mode, len(batches), shard="fsdp" if mode == "fsdp" else "ddp"
    )
    losses = []
    for batch in batches:
        loss, _ = sync.loss(batch, step=0)
        (loss / len(batches)).backward()
        losses.append(loss.detach())
    sync.finish()
    assert is_sharded(model) == (mode == "fsdp" and world_size() > 1)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads = {f"grad/{n}": g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
    return {"loss": all_reduce_mean(torch.stack(losses).mean()), **grads}


def save_models(tmp_path: Path) -> tuple[list[Path], dict]:
    cfg = Config()
    cfg.prep.image.size, cfg.prep.text.context_length, cfg.prep.text.vocab_size = 16, 8, 300
    cfg.model.image.width = cfg.model.text.width = 32
    cfg.model.image.depth = cfg.model.text.depth = 1
    cfg.model.bridge.embed_dim = 32
    cfg.model.bridge.codebook.size = 16
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
        for mode in MODES:
            for model_dir in dirs:
                result = loss_and_grads(model_dir, micro_batches(batch, rank, world), mode)
                if rank == 0:
                    tensors = {k: v.contiguous() for k, v in result.items()}
                    save_file(tensors, str(out / f"{model_dir.name}-{mode}.safetensors"))
    finally:
        shutdown_distributed()


def test_two_processes_match_one_on_the_concatenated_batch(tmp_path: Path) -> None:
    """Both gradient synchronisations and FSDP2, with two accumulated micro-batches, for every bridge."""
    dirs, batch = save_models(tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), dirs, batch, tmp_path), nprocs=2, join=True)
    for model_dir in dirs:
        single = loss_and_grads(model_dir, micro_batches(batch, 0, 1), "overlap")
        assert len(single) > 10
        for mode in MODES:
            double = load_file(tmp_path / f"{model_dir.name}-{mode}.safetensors")
            assert single.keys() == double.keys(), (model_dir.name, mode)  # unused parameters: None in both
            for name, value in single.items():
                torch.testing.assert_close(double[name], value, rtol=1e-5, atol=1e-8, msg=f"{model_dir.name} {name}")


class _RecordingTrainer(Trainer):
    """The real trainer, writing this rank's whole model state (parameters and buffers) after every step."""

    def _step(self, batches: Any) -> tuple[float, dict[str, float], int, float]:
        result = super()._step(batches)
        state = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(self.run_dir / f"state-{self.state.step}-rank{rank()}.safetensors"))
        return result


def _train_worker(rank: int, world: int, init_file: str, configs: list[Config]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for cfg in configs:
            _RecordingTrainer(cfg, torch.device("cpu"), None).run()
    finally:
        shutdown_distributed()


def test_codebook_is_identical_on_every_rank_after_each_step(shapes: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """Two gloo ranks on different data, accumulating 1 and 2 micro-batches: the EMA codebook (codes, cluster sizes
    and sums, unused-batch counters, dead-code restarts) and every parameter stay bit-identical on both ranks
    after every step."""
    steps, threshold, accumulations = 6, 2, (1, 2)
    overrides = ["model.bridge.name=codebook", f"model.bridge.codebook={{size: 64, dead_code_threshold: {threshold}}}"]
    overrides += [f"train.steps={steps}", "train.batch_size=4", "data.val=null"]
    configs = [tiny_config(shapes, tmp_path / f"accum{a}", *overrides, f"train.accum_steps={a}") for a in accumulations]
    mp.spawn(_train_worker, args=(2, str(tmp_path / "rendezvous"), configs), nprocs=2, join=True)
    for accum in accumulations:
        restarts = 0
        for step in range(1, steps + 1):
            run = tmp_path / f"accum{accum}"
            first, second = (load_file(run / f"state-{step}-rank{r}.safetensors") for r in range(2))
            assert first.keys() == second.keys()
            assert any(k.startswith("bridge.codebook.") for k in first)
            for name, value in first.items():
                assert torch.equal(value, second[name]), f"accum {accum}, step {step}: {name} differs between ranks"
            restarts += int((first["bridge.codebook.cluster_size"] == 1.0).sum())  # a restart sets N = 1 exactly
            assert int(first["bridge.codebook.unused_steps"].max()) < threshold
        assert restarts > 0, accum  # dead-code restarts happened (rank 0's vectors, broadcast) and stayed in step


TORCHRUN_STEPS = ("train.steps=6", "train.log_every=1", "train.checkpoint_every=3")  # batch 8 per rank, 16 in all


def two_rank_config(shapes: dict[str, Path], tmp_path: Path, name: str) -> tuple[Path, Path]:  # noqa: F811
    """The one-process run with batch 16 (done here), and the config file of the same run with batch 8 on each
    of two ranks; returns (single run folder, config file)."""
    single = train(tiny_config(shapes, tmp_path / "single", *TORCHRUN_STEPS, "train.batch_size=16"))
    config = tmp_path / f"{name}.yaml"
    save_config(tiny_config(shapes, tmp_path / name, *TORCHRUN_STEPS, "train.batch_size=8"), config)
    return single, config


def assert_same_training(single: Path, double: Path) -> None:
    """Two ranks trained like one process on the global batch: the logged losses and the final parameters."""

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == "train"]

    assert losses(double) == pytest.approx(losses(single), rel=1e-4)
    assert sorted(p.name for p in (double / "checkpoints" / "step_000006" / "rng").iterdir()) == [
        "rank_0.json",
        "rank_1.json",
    ]
    a, b = load_file(single / "model" / "model.safetensors"), load_file(double / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


def test_torchrun_matches_one_process_with_the_global_batch(shapes: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """``torchrun --nproc_per_node 2 -m codebridge train`` (batch 8 per rank) against one process with batch 16."""
    single, config = two_rank_config(shapes, tmp_path, "double")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "codebridge", "train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(single, tmp_path / "double")


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


def test_static_graph_refuses_accumulation() -> None:
    """DDP's static graph counts gradient hooks per step; accumulation makes the ranks' weights diverge."""
    with pytest.raises(ValueError, match="static_graph needs accum_steps 1"):
        GradientSync(torch.nn.Linear(2, 2), "overlap", 2, static_graph=True)


def _resuming_worker(rank: int, world: int, init_file: str, runs: list[tuple[Config, str | None]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for cfg, resume in runs:
            Trainer(cfg, torch.device("cpu"), resume).run()
    finally:
        shutdown_distributed()


def test_fsdp_matches_one_process_and_resumes_exactly(shapes: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """train.shard=fsdp on two gloo ranks (batch 4 each, 2 micro-batches) against one process with batch 8: the same
    losses and weights; its checkpoints hold the full state (the 1-process layout), and a run stopped at step 3 and
    resumed ends bit-identical to the uninterrupted one. Evaluation runs on every rank (the towers are sharded)."""
    common = ("train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "train.accum_steps=2")
    single = train(tiny_config(shapes, tmp_path / "single", *common, "train.batch_size=8"))
    fsdp = (*common, "train.batch_size=4", "train.shard=fsdp")
    runs = [
        (tiny_config(shapes, tmp_path / "fsdp", *fsdp), None),
        (tiny_config(shapes, tmp_path / "resumed", *fsdp, "train.steps=3", "data.val=null"), None),
        (tiny_config(shapes, tmp_path / "resumed", *fsdp), "latest"),
    ]
    mp.spawn(_resuming_worker, args=(2, str(tmp_path / "rendezvous"), runs), nprocs=2, join=True)

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == "train"]

    assert len(losses(single)) == 6
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(single), rel=1e-4)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")
    assert (tmp_path / "fsdp" / "eval.json").is_file()
    a = load_file(single / "model" / "model.safetensors")
    for run in ("fsdp", "resumed"):
        b = load_file(tmp_path / run / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
    exact = load_file(tmp_path / "fsdp" / "checkpoints" / "step_000006" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step_000006" / "model.safetensors")
    assert all(torch.equal(exact[k], resumed[k]) for k in exact)
    single_ckpt = single / "checkpoints" / "step_000006"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (
            load_file(single_ckpt / name).keys()
            == load_file(tmp_path / "fsdp" / "checkpoints" / "step_000006" / name).keys()
        )
