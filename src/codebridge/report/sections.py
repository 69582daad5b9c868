"""The report's sections, each a function of what was read or computed; a missing input becomes a visible
"Not computed" note that says which command or file would provide it."""

from __future__ import annotations

import json
import re
from typing import Any

from codebridge.config import Config
from codebridge.data.modalities import modality
from codebridge.models.bridges import bridge_class
from codebridge.report import plots
from codebridge.report.examples import Examples
from codebridge.report.html import (
    Section,
    details,
    esc,
    figure,
    grid,
    hint,
    img,
    not_computed,
    number,
    plot,
    table,
    tag,
    text,
)
from codebridge.report.run import RunFolder, is_number
from codebridge.report.usage import CodeUsage

RETRIEVAL = re.compile(r"^(?P<query>[a-z]+)_to_(?P<gallery>[a-z]+)_(?P<metric>R@\d+|median_rank|mean_rank|n_\w+)$")
ZEROSHOT = re.compile(r"^zeroshot_(?P<label>.+)_(?P<metric>top\d+|n_classes)$")
LOCALIZATION_NAMES = ("local", "heat", "pointing")  # artefact names that belong to the localization section
CODE_NAMES = ("code", "grid", "concept")  # ... and to the code-concept section
THUMBNAIL = 96
MAX_ROWS = 50  # rows shown of a list in an analysis JSON
MAX_IMAGES = 24  # analysis images shown per section


# ------------------------------------------------------------------------------------------------ summary
def describe_bridge(cfg: Config) -> str:
    """The bridge's own one-line description of itself with the run's settings."""
    return bridge_class(cfg.model.bridge.name).describe(cfg.model.bridge)


def describe_encoder(cfg: Config, name: str) -> str:
    """The modality's own one-line description of its encoder with the run's settings."""
    return modality(name).describe(cfg)


def summary_section(run: RunFolder, parameters: int | None) -> Section:
    cfg, last = run.config, run.last_train
    train = cfg.train
    rows: list[tuple[str, object]] = [
        ("run", cfg.name),
        ("folder", str(run.path)),
        ("bridge", describe_bridge(cfg)),
        ("modalities", ", ".join(cfg.data.modalities)),
        *[(f"{m} encoder", describe_encoder(cfg, m)) for m in cfg.data.modalities],
        ("training data", cfg.data.train),
        ("validation data", cfg.data.val or "none"),
        (
            "optimisation",
            f"batch {train.batch_size} x {train.accum_steps}, lr {train.lr}, warmup {train.warmup_steps}, "
            f"weight decay {train.weight_decay}, {train.precision}",
        ),
        ("steps", f"{int(last['step'])} of {train.steps}" if "step" in last else f"none logged of {train.steps}"),
    ]
    for key, label in (("samples_seen", "samples seen"), ("elapsed_min", "training minutes"), ("loss", "last loss")):
        if is_number(last.get(key)):
            rows.append((label, number(last[key])))
    if parameters is not None:
        rows.append(("parameters", number(parameters)))
    body = table(None, rows)
    retrieval, _, _ = split_metrics(run.final_eval or {})
    if retrieval:
        body += text("h3", "headline: recall@1 at the end of training")
        body += table(["direction", "R@1 (%)"], [(d, percent(m.get("R@1"))) for d, m in retrieval.items()])
    body += details("full config.yaml", text("pre", run.config_text))
    return Section("summary", "Run summary", body)


def percent(value: object) -> object:
    return round(100 * value, 1) if is_number(value) else "-"


# ------------------------------------------------------------------------------------------------ training
def training_section(run: RunFolder) -> Section:
    if not run.train:
        body = not_computed("training curves", "RUN/metrics.jsonl is missing or empty; codebridge train writes it")
        return Section("training", "Training curves", body)
    panels = plots.training_panels(run.train, run.usage_names)
    evaluated = plots.eval_panel(run.evals)
    if evaluated:
        panels.append(evaluated)
    body = hint(
        "Logged every train.log_every steps, averaged over the steps since the previous line. The loss should fall "
        "fast, then slowly; a rising logit scale means the model grows confident; a flat throughput means no stalls."
    )
    body += grid([plot(uri, title) for title, uri in panels])
    return Section("training", "Training curves", body)


# ------------------------------------------------------------------------------------------------ metrics
def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, dict], dict[str, dict], dict[str, Any]]:
    """(retrieval by direction "text -> image", zero-shot by label, everything else) of a flat metrics mapping."""
    retrieval: dict[str, dict] = {}
    zeroshot: dict[str, dict] = {}
    other: dict[str, Any] = {}
    for key, value in metrics.items():
        found = RETRIEVAL.match(key)
        if found:
            retrieval.setdefault(f"{found['query']} -> {found['gallery']}", {})[found["metric"]] = value
            continue
        found = ZEROSHOT.match(key)
        if found:
            zeroshot.setdefault(found["label"], {})[found["metric"]] = value
            continue
        other[key] = value
    return retrieval, zeroshot, other


def recall_keys(retrieval: dict[str, dict]) -> list[str]:
    return sorted({k for m in retrieval.values() for k in m if k.startswith("R@")}, key=lambda k: int(k[2:]))


def metrics_view(metrics: dict[str, Any]) -> str:
    """Retrieval table (+ recall bars), zero-shot table and any other metrics of one metrics file."""
    retrieval, zeroshot, other = split_metrics(metrics)
    parts = []
    if retrieval:
        ks = recall_keys(retrieval)
        rows = [
            (
                d,
                *(percent(m.get(k)) for k in ks),
                *(m.get(n, "-") for n in ("median_rank", "mean_rank", "n_queries", "n_gallery")),
            )
            for d, m in retrieval.items()
        ]
        header = ["direction", *(f"{k} (%)" for k in ks), "median rank", "mean rank", "queries", "gallery"]
        parts.append(table(header, rows))
        parts.append(plot(plots.recall_bars(list(retrieval.items()), ks), "recall@k per direction"))
    if zeroshot:
        tops = sorted({k for m in zeroshot.values() for k in m if k.startswith("top")}, key=lambda k: int(k[3:]))
        rows = [(label, m.get("n_classes", "-"), *(percent(m.get(k)) for k in tops)) for label, m in zeroshot.items()]
        parts.append(table(["label", "classes", *(f"{k} (%)" for k in tops)], rows))
    if other:
        parts.append(table(["metric", "value"], [(k, short(v)) for k, v in other.items()]))
    return "".join(parts)


def short(value: object, limit: int = 120) -> object:
    """Numbers as they are; anything else as compact JSON, cut at ``limit`` characters."""
    if is_number(value) or isinstance(value, str):
        return value if not isinstance(value, str) or len(value) <= limit else value[:limit] + "..."
    rendered = json.dumps(value, ensure_ascii=False)
    return rendered if len(rendered) <= limit else rendered[:limit] + "..."


def metrics_section(run: RunFolder) -> Section:
    val = run.config.data.val
    files = {f"eval/{name}.json": m for name, m in run.eval_files.items() if kind_of(name) == "other"}
    body = hint(
        "R@k: share of queries whose correct item is among the k best-scored (higher is better); median/mean rank: "
        "rank of the best correct item (1 is perfect). Zero-shot: images classified by the nearest class-name text."
    )
    if run.final_eval is not None:
        body += text("h3", f"eval.json: {val or 'validation data'} at the end of training") + metrics_view(
            run.final_eval
        )
    else:
        body += not_computed(
            "end-of-training retrieval (RUN/eval.json)",
            "Training writes it when data.val is set; or run codebridge eval --model RUN/model --data SPEC "
            "--task retrieval --out RUN/eval/retrieval.json",
        )
    for name, metrics in files.items():
        body += text("h3", name) + metrics_view(metrics)
    if not any(split_metrics(m)[1] for m in files.values()):
        body += not_computed(
            "zero-shot classification",
            "Run codebridge eval --model RUN/model --data SPEC --task zeroshot --out RUN/eval/zeroshot.json",
        )
    return Section("metrics", "Retrieval and zero-shot", body)


# ------------------------------------------------------------------------------------------------ examples
def examples_section(examples: Examples | None, missing: str, val: str | None) -> Section:
    if examples is None:
        return Section("examples", "Example queries", not_computed("example queries", missing))
    q, g = examples.query_modality, examples.gallery_modality
    body = hint(
        f"A few {q} queries of {val}, spread over the data, each with the {len(examples.examples[0].hits)} {g}s it "
        f"scores highest out of {examples.n_gallery}, best first. A green frame and a tick mark a correct {g}; "
        "'correct at rank r' is where the first correct one is."
    )
    for example in examples.examples:
        hits = "".join(
            tag(
                "div",
                img(plots.image_uri(hit.thumbnail, THUMBNAIL), f"{g} {hit.item}")
                + tag("div", esc(f"#{rank}  {hit.score:.3f}"))
                + tag("div", esc("\u2713 correct" if hit.correct else "\u00a0"), class_="mark"),
                class_="hit ok" if hit.correct else "hit",
            )
            for rank, hit in enumerate(example.hits, start=1)
        )
        heading = tag(
            "div", esc(f"\u201c{example.query}\u201d") + esc(f"  (correct at rank {example.rank})"), class_="text"
        )
        body += tag("div", heading + tag("div", hits, class_="hits"), class_="query")
    return Section("examples", "Example queries", body)


# ------------------------------------------------------------------------------------------------ analysis
def kind_of(name: str) -> str:
    """Which section an artefact belongs to, from its file name: "localization", "codes" or "other"."""
    lowered = name.lower()
    if any(word in lowered for word in LOCALIZATION_NAMES):
        return "localization"
    if any(word in lowered for word in CODE_NAMES):
        return "codes"
    return "other"


def json_view(data: Any, depth: int = 0) -> str:
    """Scalars as a key/value table, lists of objects as tables (first rows), nested objects one level down."""
    if isinstance(data, list):
        if data and all(isinstance(row, dict) for row in data):
            columns = list(dict.fromkeys(k for row in data for k in row))
            rows = [[short(row.get(c, "")) for c in columns] for row in data[:MAX_ROWS]]
            more = text("p", f"... and {len(data) - MAX_ROWS} more rows", class_="hint") if len(data) > MAX_ROWS else ""
            return table(columns, rows) + more
        return text("p", short(data, 600))
    if not isinstance(data, dict):
        return text("p", short(data))
    scalars = [(k, short(v)) for k, v in data.items() if not isinstance(v, (dict, list)) or depth >= 2]
    out = table(["name", "value"], scalars) if scalars else ""
    for key, value in data.items():
        if isinstance(value, (dict, list)) and depth < 2:
            out += text("h4", key) + json_view(value, depth + 1)
    return out


def artefacts_view(run: RunFolder, kind: str) -> str:
    """The analysis images, analysis JSON files and eval files of one kind, or "" when there are none."""
    analysis = run.path / "analysis"
    images = [p for p in run.analysis_images if kind_of(str(p.relative_to(analysis))) == kind]
    body = ""
    if images:
        shown = [figure(plots.file_uri(p), str(p.relative_to(run.path))) for p in images[:MAX_IMAGES]]
        body += grid(shown)
        if len(images) > MAX_IMAGES:
            body += hint(f"{len(images) - MAX_IMAGES} more images in {analysis}")
    sources = {f"analysis/{n}.json": d for n, d in run.analysis_json.items() if kind_of(n) == kind}
    sources |= {f"eval/{n}.json": d for n, d in run.eval_files.items() if kind_of(n) == kind and kind != "other"}
    for name, data in sources.items():
        body += text("h3", name) + json_view(data)
    return body


HEATMAP_HINT = (
    "Each heatmap shows, for one word, which image regions (or frames) the shared space links to it: bright means "
    "strong. Nobody told the model where objects are, so a heatmap on the right object is learned. Pointing game: "
    "share of object words whose heatmap peak falls inside the object's box, next to the random baseline (the mean "
    "box-area fraction)."
)
GRID_HINT = (
    "Each row of a grid is one code (or FDT token): the image patches that use it most, with its top words. A code "
    "whose patches and words show one concept is interpretable; purity and NMI measure how well codes match the "
    "emoji concepts and groups (1 is a perfect match)."
)


def artefact_section(run: RunFolder, kind: str, title: str, reading: str, missing: tuple[str, str]) -> Section:
    """The artefacts of ``kind`` after a note on how to read them, or the "Not computed" note ``missing``."""
    body = artefacts_view(run, kind)
    return Section(kind, title, hint(reading) + body if body else not_computed(*missing))


def localization_section(run: RunFolder) -> Section:
    missing = (
        "localization heatmaps and the pointing game",
        "Run codebridge localize --model RUN/model --image X --text '...' --out RUN/analysis/heatmap-NAME.png, and "
        "codebridge eval --model RUN/model --data emoji-scenes:test --task localization "
        "--out RUN/analysis/localization.json",
    )
    return artefact_section(run, "localization", "Localization", HEATMAP_HINT, missing)


def codes_section(run: RunFolder) -> Section:
    missing = (
        "code-concept grids",
        "Run codebridge eval --model RUN/model --data SPEC --task codes --out RUN/analysis/codes.json "
        "(its grid figures go under RUN/analysis/)",
    )
    return artefact_section(run, "codes", "Code-concept grids", GRID_HINT, missing)


def other_artefacts_section(run: RunFolder) -> Section | None:
    body = artefacts_view(run, "other")
    return Section("other", "Other analysis artefacts", body) if body else None


# ------------------------------------------------------------------------------------------------ usage
def usage_section(run: RunFolder, usage: CodeUsage | None, missing: str, discrete: bool | None = None) -> Section:
    """``discrete``: whether the model's bridge has a discrete space (None: no model to ask)."""
    if discrete is False:
        name = run.config.model.bridge.name
        body = hint(f"The {name} bridge has no shared discrete space (codes or tokens), so there is no code usage.")
        return Section("usage", "Code usage", body)
    body = hint(
        "How much of the shared discrete space the run uses. Used fraction near 1 and a high perplexity mean many "
        "codes share the load; agreement is how often paired inputs pick the same dominant code."
    )
    panels = plots.usage_panels(run.train, run.usage_names)
    body += text("h3", "during training (from metrics.jsonl)")
    body += (
        grid([plot(uri, f"code usage: {title}") for title, uri in panels])
        if panels
        else not_computed("usage statistics during training", "RUN/metrics.jsonl has no usage entries")
    )
    body += text("h3", "on the validation data (from the model)")
    body += usage_view(usage) if usage is not None else not_computed("code usage of the model", missing)
    return Section("usage", "Code usage", body)


def usage_view(usage: CodeUsage) -> str:
    rows = [
        (
            row["modality"],
            f"{row['used']} of {usage.size}",
            row["perplexity"],
            ", ".join(f"{code} ({100 * share:.1f}%)" for code, share in row["top"]),
        )
        for row in usage.stats()
    ]
    out = plot(plots.usage_histogram(usage.counts, usage.unit), f"share of {usage.unit} per code")
    out += table(["modality", "codes used", "perplexity", "most used codes (share)"], rows)
    overlaps = usage.overlaps()
    if overlaps:
        out += hint("Overlap of the used codes per pair (Jaccard; 1: both modalities use exactly the same codes).")
        out += table(["pair", "overlap"], overlaps)
    return out
