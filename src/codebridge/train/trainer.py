"""``codebridge train``: one process or ``torchrun --nproc_per_node N``; resumable, time-boxed, NaN-safe.

A step is ``train.accum_steps`` micro-batches of ``train.batch_size`` samples per process; gradients are averaged
over ranks before clipping, the AdamW step, the schedule step and ``bridge.post_step()``. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from codebridge.config import Config, ConfigError, save_config, validate
from codebridge.distributed import all_reduce_mean, rank, world_size
from codebridge.files import atomic_dir, atomic_write_json
from codebridge.lock import FolderInUse, folder_lock
from codebridge.train.checkpoint import (
    CHECKPOINTS,
    CONFIG_FILE,
    LATEST,
    TOKENIZER_DIR,
    TrainState,
    check_world_size,
    checkpoint_name,
    find_checkpoint,
    load_checkpoint,
    load_rng,
    save_checkpoint,
)
from codebridge.train.health import CollapseWatch, unhealthy
from codebridge.train.memory import checkpoint_towers
from codebridge.train.metrics_log import RunLog
from codebridge.train.optim import WarmupCosine, build_optimizer, lr_at
from codebridge.train.parallel import (
    GradientSync,
    barrier,
    broadcast_state,
    clip_grad_norm,
    init_distributed,
    is_sharded,
    lost_contact,
    model_state,
    rank_zero_says,
    shutdown_distributed,
)
from codebridge.train.resume import check_resume
from codebridge.train.rng import preserved_rng, seed_everything

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
MODEL_DIR = "model"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf, or the model became unhealthy (``health.unhealthy``);
    nothing was saved for that step, so every checkpoint (and ``latest``) stays healthy."""

    def __init__(self, step: int, what: str, parts: dict[str, Any], checkpoint: Path | None) -> None:
        parts = {k: float(v) for k, v in parts.items()}  # device tensors become numbers here (a failed step only)
        shown = f" (loss parts: {', '.join(f'{k}={v:.4g}' for k, v in parts.items())})" if parts else ""
        where = f"the last healthy checkpoint is {checkpoint}" if checkpoint else "no checkpoint had been written yet"
        super().__init__(
            f"training diverged at step {step}: {what}{shown}; {where}. "
            "Lower train.lr, raise train.warmup_steps, keep train.grad_clip > 0 or use train.precision=fp32, "
            "then resume with --resume latest or start again."
        )
        self.step = step
        self.parts = parts
        self.checkpoint = checkpoint


class LostContact(RuntimeError):
    """Another rank stopped answering mid-run (its process or node died, or the network failed): this rank gives up
    instead of printing the collective's traceback. ``latest`` on the shared run folder is intact."""

    def __init__(self, step: int | None, cause: str, checkpoint: Path | None) -> None:
        at = f" after step {step}" if step is not None else ""
        if checkpoint is None:
            then = "no checkpoint had been written yet: start the run again"
        else:
            then = (
                f"the last checkpoint is {checkpoint}; once every node is back, run the same torchrun command on "
                "each (same number of nodes and processes per node) with --resume latest"
            )
        super().__init__(
            f"rank {rank()} lost contact with the other ranks{at} (a process or node died, or the network failed: "
            f"{cause}); {then}"
        )
        self.step = step
        self.checkpoint = checkpoint


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def train(cfg: Config, resume: str | None = None) -> Path:
    """Train ``cfg`` (resuming from "latest", a checkpoint or a run folder) and return the run folder."""
    validate(cfg)  # a config built or changed in Python: every range and rule, before anything is written
    device, joined = init_distributed(cfg.train.dist_timeout_minutes)
    trainer: Trainer | None = None
    try:
        with _hold_output_dir(Path(cfg.output_dir), device):
            trainer = Trainer(cfg, device, resume)
            return trainer.run()
    except Exception as exc:
        if (cause := lost_contact(exc)) is None:
            raise
    finally:  # after the except block: the failed collective's traceback (which holds the DDP wrapper) is gone
        if joined:
            shutdown_distributed()
    raise LostContact(trainer.state.step if trainer else None, cause, _latest(Path(cfg.output_dir)))


def _latest(run_dir: Path) -> Path | None:
    """The checkpoint ``--resume latest`` would take, if any."""
    try:
        return find_checkpoint(run_dir, LATEST)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _hold_output_dir(folder: Path, device: torch.device) -> Any:
    """Rank 0 locks the run folder for the whole run (final save and evaluation included); all ranks learn if not."""
    with contextlib.ExitStack() as stack:
        refused: FolderInUse | None = None
        if rank() == 0:
            try:
                stack.enter_context(folder_lock(folder))
            except FolderInUse as exc:
                refused = exc
        if rank_zero_says(refused is not None, device):
            raise refused or FolderInUse(f"output_dir {folder} is in use by another run (rank 0 could not lock it)")
        yield


class Trainer:
    """Builds everything a run needs once, then ``run()`` loops over steps; one instance per run."""

    def __init__(self, cfg: Config, device: torch.device, resume: str | None) -> None:
        from codebridge.data.preprocess import Preprocessors
        from codebridge.data.sources import Problems, open_source, source_for
        from codebridge.models.encoders.pretrained import adopt_pretrained
        from codebridge.models.model import CodeBridgeModel

        self.started = time.monotonic()
        self.cfg = cfg = adopt_pretrained(cfg)  # prep.<m> from each pretrained tower's checkpoint
        self.device = device
        self.run_dir = Path(cfg.output_dir)
        self.checkpoint = find_checkpoint(self.run_dir, resume) if resume else None
        resume_note = None
        if self.checkpoint is not None:  # before anything is written: a refused resume leaves the run as it was
            check_world_size(self.checkpoint)
            resume_note = check_resume(self.checkpoint, cfg)
        self._prepare_run_dir()

        seed_everything(cfg.seed)  # the same on every rank: identical initial weights
        self.read_problems = Problems(skip=cfg.data.skip_bad)  # logged once out.log is open
        source = source_for(cfg.data.train, cfg.data, self.read_problems)
        shards = source.shards()  # shards stream; other sources are read into memory
        samples = list(source) if shards is None else None
        if cfg.data.val:
            open_source(cfg.data.val, cfg.data)  # a bad validation spec fails now, not after training
        self.tokenizer = self._tokenizer(samples)
        prep = Preprocessors(cfg.prep, self.tokenizer)
        self.model = CodeBridgeModel(cfg, cfg.data.modalities, prep).to(device)
        checkpoint_towers(self.model.encoders, cfg.train.grad_checkpointing)
        if cfg.train.compile:
            self.model.compile_step()
        broadcast_state(self.model)
        self.grad_sync = GradientSync(self.model, cfg.train.grad_sync, cfg.train.accum_steps, shard=cfg.train.shard)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = WarmupCosine(self.optimizer, cfg.train)
        self.state = TrainState(world_size=world_size())
        if self.checkpoint is not None:
            self.state = load_checkpoint(self.checkpoint, self.model, self.optimizer, self.scheduler)
        self.loader = self._loader(samples, shards, prep)
        self.log = RunLog(self.run_dir, enabled=rank() == 0, start_step=self.state.step)
        self.watch = CollapseWatch(cfg.train.batch_size * world_size())
        self.read_problems.log(cfg.data.train)
        self.last_saved = self.checkpoint
        if self.checkpoint is not None:
            load_rng(self.checkpoint)
            log.info("resumed from %s at step %d", self.checkpoint, self.state.step)
            if resume_note:
                log.info(resume_note)
        else:
            seed_everything(cfg.seed + rank())  # per-rank randomness from here on

    def _prepare_run_dir(self) -> None:
        if self.checkpoint is None and (self.run_dir / CHECKPOINTS / LATEST).exists():
            raise ConfigError(
                f"output_dir {self.run_dir} already holds a run with checkpoints; pass --resume latest to continue "
                "it, or choose another output_dir (--set output_dir=...)"
            )
        if rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / CONFIG_FILE)
        barrier()

    def _loader(self, samples: list | None, shards: list[str] | None, prep: Any) -> Any:
        """The map-style loader over ``samples``, or the stream over ``shards``, at the checkpoint's position."""
        from codebridge.data.dataset import training_loader
        from codebridge.data.stream import training_stream

        pin = self.device.type == "cuda"  # page-locked batches: to_device's non_blocking copies overlap the step
        if shards is None:
            return training_loader(self.cfg, samples, prep, rank(), world_size(), self.state.batches, pin)
        return training_stream(self.cfg, shards, prep, rank(), world_size(), self.state.batches, self.state.stream, pin)

    def _tokenizer(self, samples: list | None) -> Any:
        """The run's tokenizer: from the checkpoint on resume, else a pretrained text tower's own or a BPE trained
        by rank 0, saved by rank 0 and loaded by the rest.
        Streamed data (``samples`` None) is read once for its captions, one sample at a time; its bad rows are
        met (and counted) again by the stream."""
        if "text" not in self.cfg.data.modalities:
            return None
        from codebridge.data.dataset import all_texts
        from codebridge.data.modalities.text import Tokenizer
        from codebridge.data.sources import Problems, source_for
        from codebridge.models.encoders.pretrained import pretrained_sections, resolve

        if self.checkpoint is not None:
            return Tokenizer.load(self.checkpoint / TOKENIZER_DIR)
        folder = self.run_dir / TOKENIZER_DIR
        if rank() == 0:
            tower = pretrained_sections(self.cfg).get("text")
            data = self.cfg.data
            with atomic_dir(folder) as tmp:
                if tower is not None:
                    Tokenizer.pretrained(resolve(tower.path, "model.text.path"), self.cfg.prep.text).save(tmp)
                else:
                    texts = all_texts(source_for(data.train, data, Problems(skip=True)) if samples is None else samples)
                    Tokenizer.train(texts, self.cfg.prep.text).save(tmp)
        barrier()
        return Tokenizer.load(folder)

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> Path:
        cfg = self.cfg.train
        self.model.train()
        batches = self._batches()
        bar = tqdm(
            total=cfg.steps,
            initial=self.state.step,
            disable=not (cfg.progress and rank() == 0),
            unit="step",
            dynamic_ncols=True,
        )
        meter = _Meter()
        try:
            while self.state.step < cfg.steps:
                meter.add(*self._step(batches))
                bar.update(1)
                step = self.state.step
                stopping = step == cfg.steps or self._out_of_time()
                if step % cfg.log_every == 0 or stopping:
                    record = self._record(meter)
                    self.log.train(record)
                    if warning := self.watch.update(record):
                        log.warning(warning)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self._save()
                if stopping:
                    break
                if cfg.eval_every and step % cfg.eval_every == 0:
                    self._evaluate()
            if self.state.step < cfg.steps:
                log.info("time budget of %g minutes spent at step %d: stopping", cfg.max_minutes, self.state.step)
            bar.close()
            if self.last_saved != self.run_dir / CHECKPOINTS / checkpoint_name(self.state.step):
                self._save()
            self._save_model()
            self._evaluate()
            if bad := self._bad_samples():
                log.warning("skipped %d distinct bad sample(s) in all (data.skip_bad)", bad)
            log.info("done: %d steps in %.1f minutes; run folder %s", self.state.step, self._minutes(), self.run_dir)
            if self.watch.verdict:
                log.warning("this run looks collapsed: %s", self.watch.verdict)
        finally:
            bar.close()
            self.log.close()
            self.grad_sync.close()
        return self.run_dir

    def _batches(self) -> Any:
        while True:
            yield from self.loader

    def _step(self, batches: Any) -> tuple[float, dict[str, Any], int, float]:
        """One optimizer step; returns (loss, parts as device tensors (grad_norm a float), samples on this rank,
        seconds). Parts stay on the device: they become numbers once per log line, in ``_record``."""
        cfg = self.cfg.train
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        losses, parts, samples = [], defaultdict(float), 0
        for _ in range(cfg.accum_steps):
            batch = to_device(next(batches), self.device)
            self.state.batches = self.loader.position  # counts all-bad batches the loader left out
            self.state.stream = self.loader.state()
            samples += len(batch["index"])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, micro_parts = self.grad_sync.loss(batch, self.state.step)
            (loss / cfg.accum_steps).backward()
            losses.append(loss.detach().float())
            for name, value in micro_parts.items():
                parts[name] += value.detach().float() / cfg.accum_steps
        self.grad_sync.finish()
        mean_loss = all_reduce_mean(torch.stack(losses).mean())
        norm = clip_grad_norm(self.model, cfg.grad_clip or math.inf)
        # the step's one host read: both numbers decide whether the optimizer may step (a non-finite step is dropped)
        step_loss, grad_norm = torch.stack([mean_loss, norm.to(mean_loss)]).tolist()
        if not math.isfinite(step_loss):
            raise TrainingDiverged(self.state.step + 1, f"loss is {step_loss}", dict(parts), self.last_saved)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(self.state.step + 1, f"gradient norm is {grad_norm}", dict(parts), self.last_saved)
        self.optimizer.step()
        self.scheduler.step()
        self.model.bridge.post_step()
        self.state.step += 1
        self.state.epoch = self.loader.epoch
        self.state.samples_seen += samples * world_size()
        parts["grad_norm"] = grad_norm
        return step_loss, dict(parts), samples, time.perf_counter() - started

    def _record(self, meter: _Meter) -> dict[str, Any]:
        """The log line of the steps since the last one, averaged over steps and ranks."""
        loss, parts, samples, seconds = meter.pop()
        usage = self.model.bridge.usage()
        names = sorted(parts) + sorted(usage)
        values = [torch.as_tensor(parts.get(n, usage.get(n)), dtype=torch.float32) for n in names]
        values = all_reduce_mean(torch.stack([v.to(self.device) for v in values]))
        reduced = dict(zip(names, values.tolist(), strict=True))
        return {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "lr": lr_at(self.state.step - 1, self.cfg.train),  # of the last step taken
            "loss": loss,
            "parts": {n: reduced[n] for n in sorted(parts)},
            "usage": {n: reduced[n] for n in sorted(usage)},
            "samples_per_s": samples * world_size() / max(seconds, 1e-9),
            "samples_seen": self.state.samples_seen,
            "bad_samples": self._bad_samples(),
            "elapsed_min": self._minutes(),
        }

    def _bad_samples(self) -> int:
        """Distinct samples skipped so far (data.skip_bad): rows rejected while reading data.train, plus those that
        failed to decode on any rank."""
        decoded = torch.tensor(float(len(self.loader.dataset.bad)), device=self.device)
        read = len({p.source for p in self.read_problems.found})
        return read + round(all_reduce_mean(decoded).item() * world_size())

    def _minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    def _out_of_time(self) -> bool:
        budget = self.cfg.train.max_minutes
        return budget > 0 and rank_zero_says(self._minutes() >= budget, self.device)

    # ------------------------------------------------------------------------------------ outputs
    def _save(self) -> None:
        """Checkpoint the current step, unless the model is unhealthy: then stop like a divergence."""
        reason = unhealthy(self.model)
        if rank_zero_says(reason is not None, self.device):
            raise TrainingDiverged(self.state.step, reason or "rank 0 found the model unhealthy", {}, self.last_saved)
        self.last_saved = save_checkpoint(
            self.run_dir,
            self.state,
            self.model,
            self.optimizer,
            self.scheduler,
            self.tokenizer,
            keep=self.cfg.train.keep_checkpoints,
            config=self.cfg,
        )
        log.info("checkpoint %s", self.last_saved)

    def _save_model(self) -> None:
        """RUN/model/ (rank 0), written beside and renamed so a crash never leaves half a model."""
        state = model_state(self.model)  # collective when the towers are sharded
        if rank() == 0:
            with atomic_dir(self.run_dir / MODEL_DIR) as tmp:
                self.model.save(tmp, state)
            log.info("model saved to %s", self.run_dir / MODEL_DIR)
        barrier()

    def _evaluate(self) -> None:
        """Retrieval on ``data.val`` (rank 0; every rank in step when the towers are sharded, as their forward
        gathers parameters from all), without touching any random generator so training is unchanged."""
        spec = self.cfg.data.val
        if spec and (rank() == 0 or is_sharded(self.model)):
            from codebridge.eval.run import evaluate_model

            with preserved_rng():
                metrics = evaluate_model(self.model, spec, task="retrieval", batch_size=self.cfg.train.batch_size)
            self.model.train()
            if rank() == 0:
                self.log.eval(self.state.step, spec, metrics)
                atomic_write_json(self.run_dir / EVAL_FILE, metrics)
        barrier()


class _Meter:
    """Sums of the per-step numbers between two log lines."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.steps, self.loss, self.samples, self.seconds = 0, 0.0, 0, 0.0
        self.parts: dict[str, float] = defaultdict(float)

    def add(self, loss: float, parts: dict[str, float], samples: int, seconds: float) -> None:
        self.steps += 1
        self.loss += loss
        for name, value in parts.items():
            self.parts[name] += value
        self.samples += samples
        self.seconds += seconds

    def pop(self) -> tuple[float, dict[str, float], int, float]:
        """Means over the steps since the last ``pop`` (loss, parts), totals (samples, seconds); then reset."""
        steps = max(self.steps, 1)
        result = (self.loss / steps, {k: v / steps for k, v in self.parts.items()}, self.samples, self.seconds)
        self._reset()
        return result
