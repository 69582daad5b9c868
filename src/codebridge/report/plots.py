"""Figures of the report, each returned as a ``data:image/png;base64`` URI so the page needs no other file.

Figures are built with ``matplotlib.figure.Figure`` (rendered by Agg) rather than pyplot: no global backend or
figure state is touched, so building a report never changes the plotting setup of the calling program.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from codebridge.config import ConfigError
from codebridge.data.modalities import modality_names

Series = dict[str, list[tuple[int, float]]]
Panel = tuple[str, str]  # (title, data URI)

PANEL_SIZE = (5.2, 3.0)  # inches; at DPI 520 x 300 pixels, two side by side on the page
DPI = 100
# Keys plotted in the fixed training panels, and bookkeeping keys that are not plotted at all.
FIXED_PANELS = {"lr": "learning rate", "logit_scale": "logit scale", "samples_per_s": "throughput (samples/s)"}
NOT_PLOTTED = {"epoch", "samples_seen", "elapsed_min", "step"}
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def png_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_uri(image: Image.Image, size: int) -> str:
    """A PNG thumbnail (longest side ``size`` pixels) of a decoded image."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def file_uri(path: Path) -> str:
    """An image file as it is; checked first, so a broken file is an error here rather than a broken page."""
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ConfigError(f"{path}: not a readable image ({exc}); regenerate or delete it") from None
    mime = MIME[path.suffix.lower()]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _axes(title: str, xlabel: str = "step") -> tuple[Figure, object]:
    fig = Figure(figsize=PANEL_SIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    return fig, ax


def line_panel(title: str, series: Series) -> str:
    """One line per series over steps; single points are drawn as markers so one eval still shows."""
    fig, ax = _axes(title)
    for name, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=name, marker="o" if len(points) < 3 else None, linewidth=1.4)
    if len(series) > 1 or next(iter(series)) != title:
        ax.legend(fontsize=7, loc="best")
    return png_uri(fig)


def usage_family(key: str) -> str:
    """The statistic a usage key (``namespace/statistic[/modality or pair]``, see ``Bridge.usage``) measures, without
    namespace, modality or pair: ``fdt/image/used`` -> ``used``, ``codebook/agreement/image-text`` -> ``agreement``;
    keys of one family share a panel and a scale."""
    parts, names = key.split("/")[1:] or [key], modality_names()
    named = [p for p in parts if p not in names and not all(q in names for q in p.split("-"))]
    return named[0] if named else key


def training_panels(train: Series, usage: Collection[str] = ()) -> list[Panel]:
    """Loss (total and top-level parts), loss per modality pair, lr, logit scale, throughput, then every other
    logged scalar that is not a usage statistic (``usage``: the names the bridge logged as usage)."""
    panels: list[Panel] = []
    losses = {k: v for k, v in train.items() if k == "loss" or (k.startswith("loss/") and k.count("/") == 1)}
    pairs = {k: v for k, v in train.items() if k.startswith("loss/") and k.count("/") > 1}
    if losses:
        panels.append(("loss", line_panel("loss", losses)))
    if pairs:
        panels.append(("loss per modality pair", line_panel("loss per modality pair", pairs)))
    for key, title in FIXED_PANELS.items():
        if key in train:
            panels.append((title, line_panel(title, {key: train[key]})))
    shown = {*losses, *pairs, *FIXED_PANELS, *NOT_PLOTTED, *usage}
    for key in sorted(train):
        if key not in shown:
            panels.append((key, line_panel(key, {key: train[key]})))
    return panels


def usage_panels(train: Series, usage: Collection[str]) -> list[Panel]:
    """One panel per usage family (used fraction, perplexity, agreement, ...) with a line per modality/pair."""
    families: dict[str, Series] = {}
    for key in sorted(set(train) & set(usage)):
        families.setdefault(usage_family(key), {})[key] = train[key]
    return [(name, line_panel(name, series)) for name, series in families.items()]


def eval_panel(evals: Series) -> Panel | None:
    """Recall@1 of every logged direction over training steps (the evaluations run during training)."""
    recall = {k: v for k, v in evals.items() if k.endswith("_R@1")}
    return ("validation R@1", line_panel("validation R@1 during training", recall)) if recall else None


def recall_bars(rows: Sequence[tuple[str, dict[str, float]]], ks: Sequence[str]) -> str:
    """Grouped bars: one group per retrieval direction, one bar per R@k (in percent)."""
    fig, ax = _axes("retrieval recall", xlabel="")
    width = 0.8 / len(ks)
    x = np.arange(len(rows))
    heights = [[100 * metrics.get(k, math.nan) for _, metrics in rows] for k in ks]
    for i, k in enumerate(ks):
        ax.bar(x + i * width, heights[i], width, label=k)
    ax.set_xticks(x + width * (len(ks) - 1) / 2, [name for name, _ in rows], fontsize=8)
    ax.set_ylabel("%")
    top = np.nanmax(heights) if not np.isnan(heights).all() else 0.0
    ax.set_ylim(0, min(100, max(5.0, 1.2 * top)))  # small recalls (early runs) stay readable
    ax.legend(fontsize=8)
    return png_uri(fig)


def usage_histogram(counts: dict[str, np.ndarray], unit: str) -> str:
    """Left: usage per code index, one step line per modality. Right: the same sorted (rank-frequency, log y),
    which shows at a glance how many codes carry most of the mass and whether modalities use the space alike."""
    fig = Figure(figsize=(2 * PANEL_SIZE[0], PANEL_SIZE[1]), layout="constrained")
    by_index, ranked = fig.subplots(1, 2)
    for modality, values in counts.items():
        share = values / max(values.sum(), 1e-12)
        by_index.step(np.arange(len(share)), share, where="mid", label=modality, linewidth=1.0)
        used = np.sort(share[share > 0])[::-1]
        ranked.plot(
            np.arange(1, len(used) + 1), used, label=modality, linewidth=1.4, marker="." if len(used) < 50 else None
        )
    by_index.set_title(f"share of {unit} per code", fontsize=11)
    by_index.set_xlabel("code index")
    ranked.set_title("used codes sorted by share", fontsize=11)
    ranked.set_xlabel("rank")
    shares = [v[v > 0] / v.sum() for v in counts.values() if v.sum() > 0]
    if shares and max(s.max() for s in shares) > 10 * min(s.min() for s in shares):  # log only where it spreads
        ranked.set_yscale("log")
    for ax in (by_index, ranked):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png_uri(fig)
