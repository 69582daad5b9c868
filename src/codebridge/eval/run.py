"""``codebridge eval``: load a model and a data spec, run one task, return flat OpenCLIP-style metrics.

Tasks: ``retrieval`` (every pair of the model's modalities that all samples have, both directions),
``zeroshot`` and ``linear-probe`` (labels ``group`` and ``subgroup`` unless one is named; the classified
modality is the first of image, video, audio that the model and the data have). See docs/evaluation.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from codebridge.config import ConfigError, DataConfig, apply_overrides, from_dict, to_dict
from codebridge.data.dataset import decodable
from codebridge.data.sample import Sample
from codebridge.data.sources import open_source, source_for
from codebridge.eval.codes import evaluate_codes
from codebridge.eval.embed import embed_dataset, embed_item_parts, embed_items, matching_pairs
from codebridge.eval.fusion import fused_retrieval
from codebridge.eval.linear_probe import linear_probe
from codebridge.eval.pointing import evaluate_localization
from codebridge.eval.retrieval import bidirectional_retrieval
from codebridge.eval.windows import DEFAULT_WINDOW
from codebridge.eval.zeroshot import build_classifier, names_from_meta, zeroshot_metrics
from codebridge.models.bridges.base import Bridge

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

log = logging.getLogger(__name__)

Metrics = dict[str, float]
DEFAULT_LABELS = ("group", "subgroup")
CLASSIFIED = ("image", "video", "audio")  # the modality zero-shot and the probe classify: the first one present


class TaskNotAvailable(ConfigError, NotImplementedError):
    """The task does not apply to this model (e.g. code analysis of a bridge without codes)."""


@dataclass
class Job:
    """One evaluation: the model, the data it runs on and the task options."""

    model: CodeBridgeModel
    spec: str
    samples: list[Sample]
    data: DataConfig
    batch_size: int
    label: str | None = None
    train_spec: str | None = None
    artifacts: Path | None = None
    window: float = DEFAULT_WINDOW
    fuse_on: str | None = None  # retrieval: the validation spec that chooses the fusion weight

    def present(self, samples: list[Sample] | None = None) -> list[str]:
        """The model's modalities that every sample has."""
        samples = self.samples if samples is None else samples
        return [m for m in self.model.modalities if all(s.has(m) for s in samples)]

    def classified(self, *others: list[Sample]) -> str:
        """The modality to classify: the first of image, video, audio in the model and in all the data."""
        shared = set(self.present()).intersection(*(self.present(s) for s in others))
        for modality in CLASSIFIED:
            if modality in shared:
                return modality
        raise ConfigError(
            f"{self.spec}: nothing to classify; the model ({', '.join(self.model.modalities)}) and the data share "
            f"none of {', '.join(CLASSIFIED)}"
        )

    def labels(self) -> list[str]:
        """The label named with --label, else those of group and subgroup the data has."""
        present = sorted({name for s in self.samples for name, value in s.labels.items() if value >= 0})
        wanted = [self.label] if self.label else [name for name in DEFAULT_LABELS if name in present]
        if not wanted or any(name not in present for name in wanted):
            asked = self.label or " or ".join(DEFAULT_LABELS)
            raise ConfigError(
                f"{self.spec}: no sample has the label {asked}; labels present: {', '.join(present) or 'none'}"
                + ("" if self.label else "; pass --label NAME")
            )
        return wanted

    def embed(self, modality: str, samples: list[Sample] | None = None) -> Tensor:
        samples = self.samples if samples is None else samples
        return embed_dataset(self.model, samples, modality, self.batch_size, self.data.num_workers)


def read_samples(spec: str, data: DataConfig, model: CodeBridgeModel) -> list[Sample]:
    """The samples of ``spec``; with ``data.skip_bad``, those whose media do not decode are left out (of every
    modality at once), counted and logged."""
    samples = open_source(spec, data)
    if not data.skip_bad:
        return samples
    samples, bad = decodable(samples, list(model.modalities), model.preprocessors, data.num_workers)
    if bad:
        first = "; ".join(f"{source}: {reason}" for source, reason in bad[:3])
        log.warning("%s: evaluation skipped %d bad sample(s) (data.skip_bad); first: %s", spec, len(bad), first)
    return samples


def eval_data_config(data: DataConfig, overrides: list[str]) -> DataConfig:
    """The model's data config with ``--set data.KEY=VALUE`` overrides applied: how ``codebridge eval`` reads its
    data (skip_bad, csv_separator, csv keys, num_workers...); the rest of the model's config cannot change."""
    for item in overrides:
        if not item.strip().startswith("data."):
            raise ConfigError(
                f"--set {item}: eval accepts data.* fields only (e.g. --set data.skip_bad=true, "
                "--set data.csv_separator=';'); the model fixes everything else"
            )
    return from_dict(DataConfig, apply_overrides({"data": to_dict(data)}, overrides)["data"], "data")


def label_values(samples: list[Sample], label: str) -> Tensor:
    """``[N]`` label values, -1 where a sample lacks the label."""
    return torch.tensor([s.labels.get(label, -1) for s in samples], dtype=torch.long)


def class_names(job: Job, label: str) -> dict[int, str]:
    """The source names the classes (built-in suites do), else each sample's meta does (see zeroshot.py)."""
    names = source_for(job.spec, job.data).class_names(label)
    return names_from_meta(job.samples, label) if names is None else names


def run_retrieval(job: Job) -> Metrics:
    """Both directions of every modality pair (in the model's order), over distinct items."""
    modalities = job.present()
    if len(modalities) < 2:
        raise ConfigError(
            f"{job.spec}: retrieval needs two modalities that the model ({', '.join(job.model.modalities)}) has "
            f"and every sample has; found {', '.join(modalities) or 'none'}"
        )
    items = {m: embed_items(job.model, job.samples, m, job.batch_size, job.data.num_workers) for m in modalities}
    chunk = job.model.cfg.eval.chunk_size
    metrics: Metrics = {}
    for a, b in itertools.combinations(modalities, 2):
        pairs = matching_pairs(items[a], items[b])
        metrics |= bidirectional_retrieval(items[a].embeddings, items[b].embeddings, pairs, (a, b), chunk)
    return metrics | (run_fused(job, modalities) if job.fuse_on else {})


def run_fused(job: Job, modalities: list[str]) -> Metrics:
    """Fused retrieval (eval/fusion.py): the weight is chosen on ``job.fuse_on`` and applied to ``job.spec``."""
    val_samples = read_samples(job.fuse_on, job.data, job.model)
    missing = [m for m in modalities if m not in job.present(val_samples)]
    if missing:
        raise ConfigError(
            f"--fuse-on {job.fuse_on}: not every sample has {', '.join(missing)}; it cannot choose "
            f"the fusion weight for {job.spec}"
        )

    def parts(samples: list[Sample]) -> dict:
        return {m: embed_item_parts(job.model, samples, m, job.batch_size, job.data.num_workers) for m in modalities}

    return fused_retrieval(parts(val_samples), parts(job.samples), chunk_size=job.model.cfg.eval.chunk_size)


def run_zeroshot(job: Job) -> Metrics:
    """Top-1/top-5 per label; the first label's numbers are repeated as plain ``zeroshot_top1/top5``."""
    if "text" not in job.model.modalities:
        raise ConfigError(f"zero-shot needs a text encoder; this model has {', '.join(job.model.modalities)}")
    embeddings = job.embed(job.classified())
    cfg = job.model.cfg.eval
    metrics: Metrics = {}
    for label in job.labels():
        names = class_names(job, label)
        classifier = build_classifier(job.model, list(names.values()), cfg.zeroshot_templates, job.batch_size)
        part = zeroshot_metrics(
            embeddings, label_values(job.samples, label), classifier, list(names), label, cfg.chunk_size
        )
        if not metrics:
            metrics |= {f"zeroshot_top{k}": part[f"zeroshot_{label}_top{k}"] for k in (1, 5)}
        metrics |= part
    return metrics


def default_train_spec(spec: str, data: DataConfig) -> str:
    """The train split the source knows (built-in suites); user files must name their training data."""
    train = source_for(spec, data).split("train")
    if train is None:
        raise ConfigError(f"linear-probe on {spec}: name the data to fit the probe on with --train-data")
    return train


def run_linear_probe(job: Job) -> Metrics:
    """``linear_probe_{label}_top1``: fit on the train spec's embeddings, score on the evaluated spec's."""
    train_samples = read_samples(job.train_spec or default_train_spec(job.spec, job.data), job.data, job.model)
    modality = job.classified(train_samples)
    train_x, test_x = job.embed(modality, train_samples), job.embed(modality)
    c = job.model.cfg.eval.linear_probe_c
    return {
        f"linear_probe_{label}_top1": linear_probe(
            train_x, label_values(train_samples, label), test_x, label_values(job.samples, label), label, c
        )
        for label in job.labels()
    }


def run_localization(job: Job) -> Metrics:
    """Pointing game on scenes (and the zoom-clip frame check); see docs/localization.md."""
    return evaluate_localization(job.model, job.samples, job.batch_size, job.window)


def run_codes(job: Job) -> Metrics:
    """Code/FDT-token analysis: usage, purity and NMI against concepts/groups, top words and patches."""
    groups = source_for(job.spec, job.data).concept_groups()
    return evaluate_codes(job.model, job.samples, out_dir=job.artifacts, groups=groups, batch_size=job.batch_size)


TASKS: dict[str, Callable[[Job], Metrics]] = {
    "retrieval": run_retrieval,
    "zeroshot": run_zeroshot,
    "linear-probe": run_linear_probe,
    "localization": run_localization,
    "codes": run_codes,
}


def _has_parts(model: CodeBridgeModel) -> bool:
    """Whether the bridge gives retrieval parts (it overrides ``Bridge.retrieval_parts``); never its name."""
    return type(model.bridge).retrieval_parts is not Bridge.retrieval_parts


def evaluate_model(
    model: CodeBridgeModel,
    spec: str,
    task: str,
    train_spec: str | None = None,
    label: str | None = None,
    batch_size: int = 256,
    data: DataConfig | None = None,
    artifacts: Path | None = None,
    window: float = DEFAULT_WINDOW,
    fuse_on: str | None = None,
) -> Metrics:
    """Metrics of ``task`` for an in-memory model on ``spec`` (read with ``data``, default the model's config).

    ``artifacts``: folder for figures and tables the task writes (code grids); None writes none. ``window``:
    localization's window side over the image side (``pointing_game_windows``). ``fuse_on``: retrieval also
    reports fused scores with the weight chosen on this validation spec (eval/fusion.py).

    Runs on the model's device in eval mode without gradients; call it on one rank only.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown eval task {task!r}; choose one of {', '.join(TASKS)}")
    if fuse_on is not None and task != "retrieval":
        raise ConfigError(f"--fuse-on chooses the weight of fused retrieval; it does not apply to the {task} task")
    if fuse_on is not None and not _has_parts(model):
        raise TaskNotAvailable(
            f"fused retrieval needs a bridge with continuous and discrete parts (codebook, fdt); the "
            f"{model.cfg.model.bridge.name} bridge has no discrete part"
        )
    if task == "codes" and model.bridge.discrete_space() is None:
        raise TaskNotAvailable(
            f"code analysis needs a bridge with a discrete space (codes or tokens); the {model.cfg.model.bridge.name} "
            "bridge has no codes"
        )
    data = model.cfg.data if data is None else data
    samples = read_samples(spec, data, model)
    if not samples:
        raise ConfigError(f"{spec}: no samples to evaluate")
    job = Job(model, spec, samples, data, batch_size, label, train_spec, artifacts, window, fuse_on)
    with torch.no_grad():
        return TASKS[task](job)


def evaluate(
    model_dir: Path,
    spec: str,
    task: str,
    train_spec: str | None = None,
    label: str | None = None,
    batch_size: int = 256,
    artifacts: Path | None = None,
    window: float = DEFAULT_WINDOW,
    overrides: list[str] | None = None,
    fuse_on: str | None = None,
) -> Metrics:
    """``codebridge eval``: load the model folder (on a GPU when there is one) and evaluate it on ``spec``, read
    with the model's data config and ``overrides`` (``data.KEY=VALUE``, see ``eval_data_config``)."""
    import codebridge

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = codebridge.load(model_dir).to(device)
    data = eval_data_config(model.cfg.data, overrides or [])
    return evaluate_model(
        model,
        spec,
        task,
        train_spec=train_spec,
        label=label,
        batch_size=batch_size,
        data=data,
        artifacts=artifacts,
        window=window,
        fuse_on=fuse_on,
    )
