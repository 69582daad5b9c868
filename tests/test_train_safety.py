"""Run safety on real tiny runs: healthy checkpoints only, collapse warnings, checked resumes, torn metrics,
concurrent runs, and full or read-only disks (a real tmpfs where this process may mount one, else simulated)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import codebridge.files
from codebridge.cli import main
from codebridge.config import ConfigError, save_config
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.models.model import CodeBridgeModel
from codebridge.train import TrainingDiverged, train
from codebridge.train.checkpoint import TOKENIZER_DIR, find_checkpoint, load_checkpoint
from codebridge.train.health import unhealthy
from codebridge.train.optim import WarmupCosine, build_optimizer
from helpers import tmpfs
from test_trainer import one_thread, read_metrics, shapes, tiny_config  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def data(shapes: dict[str, Path]) -> dict[str, Path]:  # noqa: F811 (test_trainer's shapes data set)
    return shapes


def config_file(data: dict[str, Path], run: Path, *overrides: str) -> Path:
    path = run.parent / f"{run.name}.yaml"
    save_config(tiny_config(data, run, *overrides), path)
    return path


def files(run: Path) -> dict[Path, bytes]:
    """Every file of a run but the lock's holder line (rewritten by each attempt) and tensorboard's events."""
    return {
        p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock" and "tensorboard" not in p.parts
    }


def one_error_line(err: str) -> str:
    """The CLI's error: the last stderr line (log lines come before it), with no traceback anywhere."""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


# ------------------------------------------------------------------------------------------ health
def test_huge_lr_stops_at_the_last_healthy_checkpoint_which_resumes(data: dict[str, Path], tmp_path: Path) -> None:
    """train.lr=1e3 (warmed up over 1000 steps): the logit scale is 5.3 after step 2 and 0.74 after step 3, still
    with a finite loss; the run stops there (no step-3 checkpoint) and names step 2, which resumes at a sane lr."""
    run = tmp_path / "run"
    huge = ("train.lr=1e3", "train.warmup_steps=1000", "train.checkpoint_every=1", "train.log_every=1")
    cfg = tiny_config(data, run, *huge, "train.steps=10")
    with pytest.raises(TrainingDiverged, match=r"at step 3: the logit scale collapsed to 0\.7") as caught:
        train(cfg)
    good = run / "checkpoints" / "step_000002"
    assert caught.value.checkpoint == good and f"the last healthy checkpoint is {good}" in str(caught.value)
    assert find_checkpoint(run, "latest") == good and not (run / "checkpoints" / "step_000003").exists()

    model = CodeBridgeModel(cfg, cfg.data.modalities, Preprocessors(cfg.prep, Tokenizer.load(good / TOKENIZER_DIR)))
    optimizer = build_optimizer(model, cfg.train)
    load_checkpoint(good, model, optimizer, WarmupCosine(optimizer, cfg.train))
    assert unhealthy(model) is None

    sane = ("train.lr=3e-3", "train.warmup_steps=5", "train.checkpoint_every=1", "train.log_every=1")
    train(tiny_config(data, run, *sane, "train.steps=6"), resume="latest")
    assert (run / "model").is_dir() and [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert "resuming with changed settings: train.lr: 1000.0 -> 0.003" in (run / "out.log").read_text()


def test_a_collapsed_run_is_warned_about(data: dict[str, Path], tmp_path: Path) -> None:
    """At lr=1 with the logit scale clamped (FDT style) nothing becomes NaN, but the embeddings collapse: the loss
    sits at ln(16) from step 10 on; the log says so when it happens and again in the final summary."""
    run = train(tiny_config(data, tmp_path / "run", "train.lr=1", "model.bridge.logit_scale_clamp=param"))
    log = (run / "out.log").read_text()
    assert "WARNING the contrastive loss has been at chance level ln(16)=2.773 for 3 log windows" in log
    assert "WARNING this run looks collapsed: the contrastive loss has been at chance level" in log


# ------------------------------------------------------------------------------------------ resume
def test_a_refused_resume_writes_nothing(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(tiny_config(data, run, "train.steps=2"))
    before = files(run)
    conf = config_file(data, run, "train.steps=2")
    argv = ["train", "--config", str(conf), "--resume", "latest", "--set", "model.bridge.name=fdt"]
    assert main([*argv, "--set", "train.batch_size=8"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.bridge.name: 'clip' -> 'fdt', train.batch_size: 16 -> 8 would change the model" in line
    assert files(run) == before

    (run / "checkpoints" / "step_000002" / "config.yaml").unlink()  # a checkpoint from before they held a config
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1 would change"):
        train(tiny_config(data, run, "train.steps=2", "seed=1"), resume="latest")
    assert (run / "config.yaml").read_bytes() == before[run / "config.yaml"]


def test_resume_with_more_steps_is_accepted_and_noted(data: dict[str, Path], tmp_path: Path) -> None:
    run = train(tiny_config(data, tmp_path / "run", "train.steps=4", "train.checkpoint_every=2"))
    train(tiny_config(data, run, "train.steps=8", "train.checkpoint_every=2"), resume="latest")
    assert [r["step"] for r in read_metrics(run)][-1] == 8
    assert "resuming with changed settings: train.steps: 4 -> 8" in (run / "out.log").read_text()
    assert "steps: 8" in (run / "checkpoints" / "step_000008" / "config.yaml").read_text()


def test_a_torn_metrics_line_does_not_block_resume(data: dict[str, Path], tmp_path: Path) -> None:
    """A kill in the middle of an append leaves half a line; resuming from step 2 drops it and the steps after 2."""
    overrides = ("train.steps=4", "train.checkpoint_every=2", "train.log_every=1")
    run = train(tiny_config(data, tmp_path / "run", *overrides))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 5, "lo')
    train(tiny_config(data, run, *overrides), resume=str(run / "checkpoints" / "step_000002"))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert "dropped a torn last line" in (run / "out.log").read_text()


# ------------------------------------------------------------------------------------- concurrency
def test_a_second_run_into_a_busy_folder_exits_2_and_a_killed_one_frees_it(
    data: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    long = config_file(data, run, "train.steps=100000", "train.checkpoint_every=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "codebridge", "train", "--config", str(long)], env=env)
    try:
        deadline = time.monotonic() + 120
        while f"pid={first.pid} " not in _read(run / ".lock") and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "codebridge", "train", "--config", str(long), "--set", "seed=7"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2
        assert one_error_line(second.stderr).startswith(
            f"error: output_dir {run.resolve()} is in use by pid {first.pid}"
        )
        assert "seed: 0" in (run / "config.yaml").read_text()  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert train(tiny_config(data, run, "train.steps=2")) == run  # the kernel released the killed run's lock


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# ---------------------------------------------------------------------------------- unwritable disks
def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 MB tmpfs holds the step-2 checkpoint (580 kB) but not the step-4 one; without mount rights the step-4
    optimizer file's write is made to fail with ENOSPC (simulated)."""
    run = tmp_path / "disk" / "run"
    conf = config_file(data, tmp_path / "run", "train.steps=6", "train.checkpoint_every=2")
    with tmpfs(tmp_path / "disk", "size=1m") as real:
        if not real:
            commit = codebridge.files.commit

            def full_disk(tmp: Path, path: Path) -> None:
                if path.name == "optimizer.safetensors" and "step_000004" in str(path):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                commit(tmp, path)

            monkeypatch.setattr(codebridge.files, "commit", full_disk)
        assert main(["train", "--config", str(conf), "--set", f"output_dir={run}"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: cannot write {run}/checkpoints/.tmp_step_000004/")
        assert "the disk is full; free some space or write elsewhere" in line
        good = find_checkpoint(run, "latest")
        assert good.name == "step_000002" and (good / "model.safetensors").is_file()
        assert "steps: 6" in (run / "config.yaml").read_text()


def test_eval_prints_before_writing_and_keeps_the_old_file(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eval --out`` on a full disk: the metrics reach stdout, the old file is intact (a filled tmpfs, or the
    write helper made to raise ENOSPC when no tmpfs can be mounted)."""
    run = train(tiny_config(data, tmp_path / "run", "train.steps=2"))
    with tmpfs(tmp_path / "disk", "size=64k") as real:
        out = tmp_path / "disk" / "r.json"
        out.write_text("old results\n")
        if real:
            with open(tmp_path / "disk" / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="space"):
                while True:
                    f.write(b"\0" * 4096)
        else:

            def full_disk(tmp: Path, path: Path) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            monkeypatch.setattr(codebridge.files, "commit", full_disk)
        argv = ["eval", "--model", str(run / "model"), "--data", str(data["val"]), "--task", "retrieval"]
        assert main([*argv, "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert "text_to_image_R@1" in json.loads(captured.out)
        assert one_error_line(captured.err).startswith(f"error: cannot write {out}: the disk is full")
        assert out.read_text() == "old results\n"


def test_read_only_outputs_fail_before_any_work(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A read-only tmpfs; as a non-root user a chmod'ed folder does too (root ignores permissions: then skipped)."""
    with tmpfs(tmp_path / "ro", "ro") as real:
        if not real:
            if os.geteuid() == 0:
                pytest.skip("needs a read-only mount (mount rights) or a non-root user")
            (tmp_path / "ro").chmod(0o555)
        conf = config_file(data, tmp_path / "run", "train.steps=2")
        assert main(["train", "--config", str(conf), "--set", f"output_dir={tmp_path / 'ro' / 'run'}"]) == 2
        assert one_error_line(capsys.readouterr().err).startswith("error: cannot ")
        started = time.monotonic()
        argv = ["eval", "--model", "no-model", "--data", str(data["val"]), "--task", "retrieval"]
        assert main([*argv, "--out", str(tmp_path / "ro" / "r.json")]) == 2  # checked before the model is read
        assert one_error_line(capsys.readouterr().err).startswith(f"error: cannot write {tmp_path / 'ro' / 'r.json'}")
        assert time.monotonic() - started < 5
