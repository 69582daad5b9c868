"""Where a run reports: ``metrics.jsonl`` (machine-readable), ``tensorboard/`` and ``out.log`` (readable).

Only rank 0 writes files; other ranks get a logger that prints warnings only. ``metrics.jsonl`` holds one JSON
object per line, ``{"kind": "train", "step", "epoch", "lr", "loss", "parts", "samples_per_s", "usage", ...}``
or ``{"kind": "eval", "step", "data", "metrics"}``; ``step`` counts completed optimizer steps.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from codebridge.config import ConfigError
from codebridge.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "out.log"
TENSORBOARD_DIR = "tensorboard"
LOGGER = "codebridge"  # the package logger, so data warnings (skipped samples) land in out.log too

log = logging.getLogger(__name__)


class _TqdmHandler(logging.Handler):
    """Console lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def truncate_metrics(path: Path, step: int) -> None:
    """Before a (resumed) run appends: drop records past ``step`` (written by a killed run after its last
    checkpoint) and a torn last line (a kill in the middle of an append); the file is replaced atomically."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: dropped a torn last line (the previous run was killed while writing it)", path)
                break
            raise ConfigError(
                f"{path}:{number}: not a JSON record; delete that line (or the file, losing the curves) and resume"
            ) from None
        if record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RunLog:
    """Writes train/eval records to every sink; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0) -> None:
        self.enabled = enabled
        self._logger = logging.getLogger(LOGGER)
        self._handlers: list[logging.Handler] = []
        self._previous_level = self._logger.level
        self._writer = None
        if not enabled:
            return
        self._logger.setLevel(logging.INFO)
        for handler in (logging.FileHandler(run_dir / LOG_FILE), _TqdmHandler()):
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            self._logger.addHandler(handler)
            self._handlers.append(handler)
        self.metrics_path = run_dir / METRICS_FILE
        truncate_metrics(self.metrics_path, start_step)
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only

        self._writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step or None)

    def _append(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append({"kind": "train", **record})
        step = record["step"]
        scalars = {
            "train/loss": record["loss"],
            "train/lr": record["lr"],
            "train/samples_per_s": record["samples_per_s"],
            **{f"train/{k}": v for k, v in record["parts"].items()},
            **{f"usage/{k}": v for k, v in record["usage"].items()},
        }
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        parts = " ".join(f"{k}={v:.4g}" for k, v in record["parts"].items())
        log.info(
            "step %d epoch %d lr %.3g loss %.4f %.1f samples/s %s",
            step,
            record["epoch"],
            record["lr"],
            record["loss"],
            record["samples_per_s"],
            parts,
        )

    def eval(self, step: int, data: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append({"kind": "eval", "step": step, "data": data, "metrics": metrics})
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, value in numbers.items():
            self._writer.add_scalar(f"val/{name}", value, step)
        log.info("eval at step %d on %s: %s", step, data, " ".join(f"{k}={v:.4g}" for k, v in numbers.items()))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for handler in self._handlers:
            self._logger.removeHandler(handler)
            handler.close()
        self._logger.setLevel(self._previous_level)
