"""Science benchmark: every bridge trained with the same encoders, data and time budget, evaluated on the emoji suites
and the multi-style corpus (``--tasks corpus-style``: train on every emoji style but twitter, test on the twitter art
with the old style split's queries and with every corpus caption; needs ``codebridge data corpus``).

Writes ``docs/results/bridges.json`` keyed bridge -> suite -> OpenCLIP-style metric name (plus the budget and the
command used) and ``docs/results/bridges.md`` with the table. Run:

    python benchmarks/bridges.py --bridges clip codebook fdt --minutes 10 --seeds 0 1 2

Each (bridge, task, seed) is one training run of at most ``--minutes`` wall-clock minutes and ``--steps`` steps,
whichever ends first; the run folders are kept under ``--runs``. A "bridge" is a recipe variant: ``clip`` trains
``configs/emoji-clip.yaml``, ``clip-minilm`` trains ``configs/emoji-clip-minilm.yaml`` (task suffixes apply).

Seeds: each cell keeps every seed's figures (``per_seed``); its plain metrics are their mean and ``std`` their
sample standard deviation. A difference between two cells is called a win only when it exceeds two standard
deviations of the difference, sqrt(std_a^2 + std_b^2) (what one more run of each would scatter by); with fewer
than two seeds per cell nothing is called a win.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from codebridge.config import load_config
from codebridge.eval.run import TaskNotAvailable, evaluate
from codebridge.files import atomic_write_text
from codebridge.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]

# task -> (recipe suffix, overrides of the recipe, [(suite written in the results, eval spec, eval task)]); a
# corpus task's validation split also chooses the weight of fused retrieval for the bridges that have one
TASKS: dict[str, tuple[str, list[str], list[tuple[str, str, str]]]] = {
    "style": ("", [], [("emoji-style", "emoji-style:test", "retrieval")]),
    "concept": (
        "",
        ["data.train=emoji-concept:train", "data.val=emoji-concept:test"],
        [("emoji-concept", "emoji-concept:test", "retrieval")],
    ),
    # the multi-style corpus (`codebridge data corpus`): train on every emoji style but the held-out one
    "corpus-style": (
        "",
        ["data.train=corpus-style:train", "data.val=corpus-style:val"],
        # the headline queries the twitter art with the old style split's test set (one CLDR label per concept) so
        # it compares with emoji-style; -captions: every caption of the corpus (templates, keywords, 4 languages)
        [
            ("corpus-style", "emoji-style:test", "retrieval"),
            ("corpus-style-captions", "corpus-style:test", "retrieval"),
        ],
    ),
    "corpus-style-noto": (
        "",
        ["data.train=corpus-style-noto:train", "data.val=corpus-style-noto:val"],
        [("corpus-style-noto", "corpus-style-noto:test", "retrieval")],
    ),
    "speech": ("-speech", [], [("emoji-voice", "emoji-voice:test", "retrieval")]),
    "video": ("-video", [], [("emoji-clips", "emoji-clips:test", "retrieval")]),
    # scene captions average 23 tokens: a 32-token context keeps their later object words; 64 px images give an
    # 8 x 8 patch grid (objects span 2-3 patches); the single emoji teach the names that the scenes combine; local
    # attention keeps each patch token about its own place (docs/localization.md, "Training for localization")
    "scenes": (
        "",
        [
            "data.train=emoji-style:train::emoji-scenes:train",
            "data.val=emoji-scenes:test",
            "prep.text.context_length=32",
            "prep.image.size=64",
            "model.image.attention_radius=1",
            "train.batch_size=128",
        ],
        [("emoji-scenes", "emoji-scenes:test", "localization"), ("emoji-scenes", "emoji-scenes:test", "retrieval")],
    ),
}
USAGE_PREFIXES = ("usage/", "fdt/", "codebook/", "agreement")


def run_task(bridge: str, task: str, seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    suffix, task_overrides, evals = TASKS[task]
    out_dir = args.runs / f"{bridge}-{task}-seed{seed}"
    overrides = [
        f"output_dir={out_dir}",
        f"seed={seed}",
        f"train.max_minutes={args.minutes}",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        *task_overrides,
        *args.set,
    ]
    cfg = load_config(ROOT / "configs" / f"emoji-{bridge}{suffix}.yaml", overrides)
    started = time.perf_counter()
    if args.eval_only:
        run_dir = out_dir
        if not (run_dir / "model").is_dir():
            raise SystemExit(f"--eval-only: {run_dir / 'model'} does not exist; train it first (drop --eval-only)")
    else:
        run_dir = train(cfg, resume="latest" if args.resume and (out_dir / "checkpoints").exists() else None)
    minutes = (time.perf_counter() - started) / 60
    results: dict[str, dict[str, float]] = {}
    for suite, spec, eval_task in evals:
        metrics = results.setdefault(suite, {})
        fuse_on = cfg.data.val if eval_task == "retrieval" and cfg.data.val.endswith(":val") else None
        metrics.update(
            evaluate_fused(run_dir / "model", spec, fuse_on)
            if fuse_on
            else evaluate(run_dir / "model", spec, eval_task)
        )
        if not args.eval_only:  # re-evaluation keeps the training figures already in the results
            metrics["train_minutes"] = round(minutes, 2)
            metrics["budget_minutes"] = args.minutes
        metrics["train_steps"] = last_step(run_dir)
        metrics.update(last_usage(run_dir))
    return results


def evaluate_fused(model: Path, spec: str, fuse_on: str) -> dict[str, float]:
    """Retrieval, plus fused retrieval with its weight chosen on ``fuse_on`` where the bridge has a discrete part."""
    try:
        return evaluate(model, spec, "retrieval", fuse_on=fuse_on)
    except TaskNotAvailable:  # clip: no discrete part to fuse
        return evaluate(model, spec, "retrieval")


def last_step(run_dir: Path) -> int:
    """Optimizer steps the run took (its last logged step)."""
    steps = [json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(steps, default=0)


def last_usage(run_dir: Path) -> dict[str, float]:
    """The code/token usage and cross-modal agreement logged last during training (discrete bridges)."""
    usage: dict[str, float] = {}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    for line in lines:
        record = json.loads(line)
        for key, value in {**record, **record.get("usage", {})}.items():
            if key.startswith(USAGE_PREFIXES) and isinstance(value, (int, float)):
                usage[key] = value
    return usage


RECALLS = [f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
TABLE_METRICS = [
    *(("emoji-style", m) for m in RECALLS),
    *(("emoji-concept", m) for m in RECALLS),
    *(("corpus-style", m) for m in RECALLS),
    *(("corpus-style", f"fused_{m}") for m in RECALLS if m.endswith("R@1")),
    ("corpus-style", "fusion_weight"),
    *(("corpus-style-captions", m) for m in RECALLS if m.endswith("R@1")),
    *(("corpus-style-captions", f"fused_{m}") for m in RECALLS if m.endswith("R@1")),
    *(("corpus-style-noto", m) for m in RECALLS),
    ("emoji-voice", "image_to_audio_R@1"),
    ("emoji-voice", "audio_to_image_R@1"),
    ("emoji-clips", "video_to_text_R@1"),
    ("emoji-clips", "text_to_video_R@1"),
    ("emoji-scenes", "pointing_game"),
    ("emoji-scenes", "pointing_game_caption_map"),
    ("emoji-scenes", "pointing_game_contrastive"),
    ("emoji-scenes", "pointing_game_phrase"),
    ("emoji-scenes", "pointing_game_phrase_control"),
    ("emoji-scenes", "pointing_game_windows"),
    ("emoji-scenes", "pointing_game_random"),
    ("emoji-scenes", "text_to_image_R@1"),
    ("emoji-scenes", "train_steps"),
    # usage and cross-modal agreement logged at the end of training (docs/bridges-*.md)
    ("emoji-style", "codebook/perplexity"),
    ("emoji-style", "codebook/dead_fraction"),
    ("emoji-style", "codebook/agreement"),
    ("emoji-style", "fdt/image/active"),
    ("emoji-style", "fdt/text/active"),
    ("emoji-style", "fdt/agree/image-text"),
    ("emoji-style", "train_steps"),
    ("corpus-style", "fdt/image/active"),
    ("corpus-style", "fdt/text/active"),
    ("corpus-style", "fdt/agree/image-text"),
    ("corpus-style", "codebook/perplexity"),
    ("corpus-style", "codebook/dead_fraction"),
    ("corpus-style", "codebook/agreement"),
    ("corpus-style", "train_steps"),
    ("corpus-style-noto", "train_steps"),
]


def add_seed(cell: dict[str, Any], seed: int, metrics: dict[str, float]) -> None:
    """Record one seed's figures in a result cell and recompute the cell's means and standard deviations."""
    per_seed = cell.setdefault("per_seed", {})
    per_seed[str(seed)] = {**per_seed.get(str(seed), {}), **metrics}
    names = {name for figures in per_seed.values() for name in figures}
    std: dict[str, float] = {}
    for name in sorted(names):
        values = [figures[name] for figures in per_seed.values() if name in figures]
        cell[name] = statistics.fmean(values)
        if len(values) > 1:
            std[name] = statistics.stdev(values)
    cell["std"] = std
    cell["n_seeds"] = len(per_seed)


def compare(
    a: dict[str, Any], b: dict[str, Any], metric: str, b_metric: str | None = None
) -> tuple[float, float | None, str]:
    """Difference of cell ``a``'s ``metric`` over cell ``b``'s ``b_metric`` (default the same), the standard
    deviation of that difference (None with fewer than two seeds on either side) and the verdict: "win", "loss" or
    "within noise"."""
    b_metric = b_metric or metric
    diff = a[metric] - b[b_metric]
    if a.get("n_seeds", 1) < 2 or b.get("n_seeds", 1) < 2:
        return diff, None, "one seed: no verdict"
    sd = math.hypot(a["std"].get(metric, 0.0), b["std"].get(b_metric, 0.0))
    if abs(diff) > 2 * sd:
        return diff, sd, "win" if diff > 0 else "loss"
    return diff, sd, "within noise"


def _cell(cell: dict[str, Any], metric: str) -> str:
    value = cell.get(metric)
    if value is None:
        return "n/a"
    text = f"{value:.0f}" if abs(value) >= 10 else f"{value:.3f}"
    if metric in cell.get("std", {}):
        spread = cell["std"][metric]
        text += f" ± {spread:.0f}" if abs(value) >= 10 else f" ± {spread:.3f}"
    return text


# (suite, metric of the bridge, metric of the baseline): every other bridge against the baseline in the verdicts
VERDICTS = [
    ("emoji-style", "text_to_image_R@1", "text_to_image_R@1"),
    ("emoji-concept", "text_to_image_R@1", "text_to_image_R@1"),
    ("corpus-style", "text_to_image_R@1", "text_to_image_R@1"),
    ("corpus-style", "fused_text_to_image_R@1", "text_to_image_R@1"),  # a discrete bridge's fused scores vs clip's
    ("corpus-style-noto", "text_to_image_R@1", "text_to_image_R@1"),
    ("emoji-scenes", "pointing_game_phrase", "pointing_game_phrase"),
]
# (suite, metric, its word-blind control): every bridge against itself, to tell maps that find the named object
# from maps that find any object (docs/localization.md)
CONTROLS = [
    ("emoji-scenes", "pointing_game", "pointing_game_caption_map"),
    ("emoji-scenes", "pointing_game_phrase", "pointing_game_phrase_control"),
]
BASELINE = "clip"


def verdict_lines(results: dict[str, Any], bridges: list[str]) -> list[str]:
    rows = []
    for suite, metric, base_metric in VERDICTS:
        base = results.get(BASELINE, {}).get(suite)
        if not base or base_metric not in base:
            continue
        for b in bridges:
            cell = results[b].get(suite)
            if b == BASELINE or not cell or metric not in cell:
                continue
            diff, sd, verdict = compare(cell, base, metric, base_metric)
            seeds = f"{cell.get('n_seeds', 1)} / {base.get('n_seeds', 1)}"
            sd_text = "n/a" if sd is None else f"{sd:.3f}"
            versus = metric if metric == base_metric else f"{metric} vs {base_metric}"
            rows.append(f"| {suite} | {versus} | {b} - {BASELINE} | {diff:+.3f} | {sd_text} | {seeds} | {verdict} |")
    controls = []
    for suite, metric, control in CONTROLS:
        for b in bridges:
            cell = results[b].get(suite)
            if cell and metric in cell and control in cell:
                diff, sd, verdict = compare(cell, cell, metric, control)
                sd_text = "n/a" if sd is None else f"{sd:.3f}"
                controls.append(f"| {suite} | {b} | {metric} - {control} | {diff:+.3f} | {sd_text} | {verdict} |")
    lines = []
    if rows:
        lines += [
            "",
            f"Against {BASELINE}: a difference is a win only beyond 2 standard deviations of the difference",
            "(sqrt(std_a^2 + std_b^2) over seeds).",
            "",
            "| suite | metric | cells | difference | std of difference | seeds | verdict |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    if controls:
        lines += [
            "",
            "Against each bridge's own word-blind control (the same rule):",
            "",
            "| suite | bridge | map - control | difference | std of difference | verdict |",
            "|---|---|---|---|---|---|",
            *controls,
        ]
    return lines


def write_table(results: dict, path: Path) -> None:
    bridges = [b for b in results if not b.startswith("_")]
    meta = results["_meta"]
    lines = [
        "# Bridges on the emoji benchmark and the multi-style corpus",
        "",
        f"Training runs on {meta['machine']}; a cell is the mean ± standard deviation over its seeds (no ± : one",
        "seed). Each cell's seeds, budget, minutes and steps are in bridges.json (`per_seed`, `n_seeds`,",
        "`budget_minutes`, `train_minutes`, `train_steps`). Commands, in order:",
        "",
        *(f"- `{c}`" for c in meta["commands"]),
        "",
        "| suite | metric | " + " | ".join(bridges) + " |",
        "|---|---|" + "---|" * len(bridges),
    ]
    for suite, metric in TABLE_METRICS:
        cells = [_cell(results[b].get(suite, {}), metric) for b in bridges]
        if any(c != "n/a" for c in cells):  # a results file with some suites only shows those
            lines.append(f"| {suite} | {metric} | " + " | ".join(cells) + " |")
    lines += verdict_lines(results, bridges)
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bridges", nargs="+", default=["clip", "codebook", "fdt"], help="recipe variants: emoji-NAME.yaml each"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per seed and cell")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per training run")
    parser.add_argument("--steps", type=int, default=3000, help="step cap per training run")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bridges.json")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--resume", action="store_true", help="resume interrupted runs instead of restarting")
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate the models already in --runs again, without training"
    )
    args = parser.parse_args(argv)

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    command = "python benchmarks/bridges.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = results.setdefault("_meta", {})
    meta["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    meta["commands"] = [c for c in meta.get("commands", []) if c != command] + [command]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed-major: a stopped benchmark leaves every bridge with the same seeds
        for task in args.tasks:
            for bridge in args.bridges:
                for suite, metrics in run_task(bridge, task, seed, args).items():
                    add_seed(results.setdefault(bridge, {}).setdefault(suite, {}), seed, metrics)
                atomic_write_text(args.out, json.dumps(results, indent=2, sort_keys=True))
                write_table(results, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
