"""Read a run folder into plain data: the config, the logged series, the metric files and the analysis artefacts.

Everything except ``config.yaml`` is optional, so a report can be written for a run that is still training or
that was never evaluated; a file that exists but cannot be read is a ``ConfigError`` naming the file (and line).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codebridge.config import Config, ConfigError, load_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
EVAL_DIR = "eval"
ANALYSIS_DIR = "analysis"
MODEL_DIR = "model"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NESTED = ("parts", "usage", "metrics")  # trainer records nest their numbers under these keys

Series = dict[str, list[tuple[int, float]]]  # scalar name -> (step, value) in file order


@dataclass
class RunFolder:
    """What a report can show of one run; absent parts are empty."""

    path: Path
    config: Config
    config_text: str
    train: Series = field(default_factory=dict)  # train records: loss, lr, parts, usage, throughput
    evals: Series = field(default_factory=dict)  # eval records logged during training
    last_train: dict[str, Any] = field(default_factory=dict)  # the last train record, flattened
    usage_names: set[str] = field(default_factory=set)  # train keys logged under "usage" (the bridge's usage())
    final_eval: dict[str, Any] | None = None  # eval.json
    eval_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval/NAME.json -> metrics
    analysis_images: list[Path] = field(default_factory=list)  # analysis/**/*.png|jpg
    analysis_json: dict[str, Any] = field(default_factory=dict)  # analysis/NAME.json -> content

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); rewrite it or delete it to leave it out") from None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_record(record: dict[str, Any]) -> dict[str, Any]:
    """One level: the trainer's ``parts``/``usage``/``metrics`` mappings merge into the record (their keys are
    already namespaced, e.g. ``loss/contrastive/image-text``); flat records pass through unchanged."""
    flat = {k: v for k, v in record.items() if k not in NESTED or not isinstance(v, dict)}
    for key in NESTED:
        if isinstance(record.get(key), dict):
            flat |= record[key]
    return flat


def is_eval_record(record: dict[str, Any]) -> bool:
    return record.get("kind") == "eval" or (record.get("kind") is None and isinstance(record.get("metrics"), dict))


def read_metrics(path: Path) -> tuple[Series, Series, dict[str, Any], set[str]]:
    """(train series, eval series, last train record, names of usage statistics) of ``metrics.jsonl``; a bad line
    names file:line."""
    train: Series = {}
    evals: Series = {}
    last: dict[str, Any] = {}
    usage: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc}); fix or delete that line") from None
        if not isinstance(record, dict) or not is_number(record.get("step")):
            raise ConfigError(f"{path}:{number}: expected a JSON object with a numeric 'step'; fix or delete that line")
        flat = flatten_record(record)
        target = evals if is_eval_record(record) else train
        if target is train:
            last = flat
            usage |= set(record["usage"]) if isinstance(record.get("usage"), dict) else set()
        for name, value in flat.items():
            if name != "step" and is_number(value):
                target.setdefault(name, []).append((int(record["step"]), float(value)))
    return train, evals, last, usage


def read_run(run_dir: Path) -> RunFolder:
    """Read ``run_dir`` (written by ``codebridge train``); only ``config.yaml`` is required."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass the output_dir of a training run")
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; {run_dir} is not a run folder written by codebridge train")
    run = RunFolder(run_dir, load_config(config_path), config_path.read_text())
    if (run_dir / METRICS_FILE).is_file():
        run.train, run.evals, run.last_train, run.usage_names = read_metrics(run_dir / METRICS_FILE)
    if (run_dir / EVAL_FILE).is_file():
        run.final_eval = _metrics_file(run_dir / EVAL_FILE)
    for path in sorted((run_dir / EVAL_DIR).glob("*.json")):
        run.eval_files[path.stem] = _metrics_file(path)
    analysis = run_dir / ANALYSIS_DIR
    if analysis.is_dir():
        run.analysis_images = sorted(p for p in analysis.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        run.analysis_json = {p.stem: read_json(p) for p in sorted(analysis.glob("*.json"))}
    return run


def _metrics_file(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of metric names to values, got {type(data).__name__}")
    return data
