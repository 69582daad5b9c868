"""``codebridge report RUN_DIR``: read the run folder, compute what needs the model, write one HTML file."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from codebridge.config import ConfigError
from codebridge.data.sample import BadSampleError, Sample
from codebridge.report import sections
from codebridge.report.examples import Examples, example_queries, spread
from codebridge.report.html import page
from codebridge.report.run import RunFolder, read_run
from codebridge.report.usage import CodeUsage, model_code_usage

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"


@dataclass
class ModelViews:
    """What the report computes with the model on the validation data; ``missing`` says why it could not."""

    parameters: int | None = None
    examples: Examples | None = None
    usage: CodeUsage | None = None
    discrete: bool | None = None  # whether the bridge has a discrete space (None: no model)
    missing: str = ""


def load_model(run: RunFolder) -> CodeBridgeModel | None:
    """RUN/model on a GPU when there is one; None while training has not written it yet."""
    if not run.model_dir.is_dir():
        return None
    import codebridge

    return codebridge.load(run.model_dir, map_location="cuda" if torch.cuda.is_available() else "cpu")


def validation_samples(run: RunFolder, max_samples: int) -> tuple[list[Sample], str]:
    """At most ``max_samples`` samples of ``data.val`` (an even spread) and "", or [] and why there are none."""
    from codebridge.data.sources import open_source

    spec = run.config.data.val
    if not spec:
        return [], "the run has no validation data (data.val is null); set it in config.yaml to get examples"
    try:
        samples = open_source(spec, run.config.data)
    except (FileNotFoundError, ConfigError, BadSampleError) as exc:
        return [], f"the validation data {spec} cannot be read here ({exc})"
    if len(samples) > max_samples:
        log.info("report: using %d of the %d samples of %s", max_samples, len(samples), spec)
        samples = [samples[i] for i in spread(len(samples), max_samples)]
    return samples, "" if samples else f"the validation data {spec} has no samples"


def model_views(run: RunFolder, queries: int, batch_size: int, max_samples: int) -> ModelViews:
    model = load_model(run)
    if model is None:
        return ModelViews(missing=f"{run.model_dir} does not exist yet; training writes it when it finishes")
    views = ModelViews(
        parameters=sum(p.numel() for p in model.parameters()), discrete=model.bridge.discrete_space() is not None
    )
    samples, views.missing = validation_samples(run, max_samples)
    if not samples:
        return views
    log.info("report: encoding %d validation samples", len(samples))
    views.examples = example_queries(model, samples, count=queries, batch_size=batch_size)
    if views.examples is None:
        views.missing = f"the model and {run.config.data.val} share no (text or audio, image or video) pair"
    views.usage = model_code_usage(model, samples, batch_size=batch_size)
    return views


def build_report(
    run_dir: Path, out: Path | None = None, queries: int = 4, max_samples: int = 5000, batch_size: int = 256
) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default RUN/report.html) and return its path.

    ``queries`` example queries are shown with their top-5 results. The model parts (examples, code usage) need
    RUN/model and the run's validation data (data.val), of which they use at most ``max_samples`` (an even
    spread, so the report stays quick on big data); each is replaced by a "Not computed" note when missing.
    """
    if queries < 1 or max_samples < 1:
        raise ValueError(f"queries and max_samples must be at least 1, got {queries} and {max_samples}")
    run = read_run(Path(run_dir))
    views = model_views(run, queries, batch_size, max_samples)
    cfg = run.config
    parts = [
        sections.summary_section(run, views.parameters),
        sections.training_section(run),
        sections.metrics_section(run),
        sections.examples_section(views.examples, views.missing, cfg.data.val),
        sections.localization_section(run),
        sections.codes_section(run),
        sections.usage_section(run, views.usage, views.missing, views.discrete),
        sections.other_artefacts_section(run),
    ]
    written = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = f"{cfg.model.bridge.name} bridge, {' + '.join(cfg.data.modalities)}; report written {written}"
    out = Path(out) if out is not None else run.path / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(f"codebridge run: {cfg.name}", subtitle, [s for s in parts if s is not None]), "utf-8")
    return out
