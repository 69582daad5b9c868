"""``codebridge demo``: the one command that shows everything on the built-in data.

Builds the emoji benchmark if missing, trains a small model for a few minutes, evaluates retrieval and zero-shot
on the held-out art style (plus localization and code analysis where available), writes the HTML report, and
prints where it all is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from codebridge.config import load_config
from codebridge.files import atomic_write_json
from codebridge.lock import folder_lock
from codebridge.paths import emoji_root

DEMO_EVALS = [  # (task, data spec, file name under RUN/eval/)
    ("retrieval", "emoji-style:test", "retrieval.json"),
    ("zeroshot", "emoji-style:test", "zeroshot.json"),
    ("localization", "emoji-scenes:test", "localization.json"),
    ("codes", "emoji-style:test", "codes.json"),
]


def run_demo(
    out: Path = Path("runs/demo"),
    recipe: str = "emoji-fdt",
    minutes: float = 8.0,
    data_root: Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Run the whole pipeline; returns the run folder. Steps that are not available are reported, not hidden.

    The run folder is locked throughout (training, evaluations, heatmaps, report): one demo per folder at a time.
    """
    with folder_lock(out, "demo run folder", "pass another --out"):
        return _pipeline(out, recipe, minutes, data_root, overrides)


def _pipeline(out: Path, recipe: str, minutes: float, data_root: Path | None, overrides: list[str] | None) -> Path:
    from codebridge.data.emoji.build import build_emoji
    from codebridge.data.emoji.manifest import read_manifest
    from codebridge.data.sources import open_source
    from codebridge.eval.run import TaskNotAvailable, evaluate_model
    from codebridge.localize import localize_cli
    from codebridge.report import build_report
    from codebridge.train.trainer import train

    started = time.perf_counter()
    root = emoji_root(data_root)
    manifest = read_manifest(root) or build_emoji(out=root)  # an existing build (even a subset) is used as it is
    print(f"[1/4] emoji data at {root}: {json.dumps(manifest['counts'])}")

    settings = [f"output_dir={out}", f"train.max_minutes={minutes}", *(overrides or [])]
    if data_root is not None:
        settings.append(f"data.root={data_root}")
    cfg = load_config(recipe, settings)
    print(f"[2/4] training {recipe} for at most {minutes:g} minutes (run folder {out})")
    run_dir = train(cfg)

    import codebridge

    model = codebridge.load(run_dir / "model")
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    analysis = run_dir / "analysis"
    analysis.mkdir(exist_ok=True)
    print("[3/4] evaluating")
    summary: dict[str, float | str] = {}
    for task, spec, name in DEMO_EVALS:
        try:
            metrics = evaluate_model(model, spec, task, data=cfg.data, artifacts=analysis)
        except TaskNotAvailable as exc:  # e.g. code analysis of a bridge without codes
            summary[task] = f"not available: {exc}"
            continue
        atomic_write_json(eval_dir / name, metrics)
        summary.update(
            {k: v for k, v in metrics.items() if k.endswith(("R@1", "top1", "pointing_game", "pointing_game_windows"))}
        )
    for key, value in summary.items():
        print(f"    {key}: {value:.3f}" if isinstance(value, float) else f"    {key}: {value}")

    scene = open_source("emoji-scenes:test", cfg.data)[0]
    for method, suffix in (("tokens", ""), ("windows", "_windows")):
        heat = localize_cli(
            run_dir / "model",
            image=scene.media["image"],
            text=scene.media["text"][0],
            out=analysis / f"localization_scene{suffix}.png",
            method=method,
        )
        print(f"    heatmaps ({method}) for {scene.media['text'][0]!r}: {heat['png']}")

    report = build_report(run_dir)
    print(f"[4/4] done in {(time.perf_counter() - started) / 60:.1f} min")
    print(f"    run folder: {run_dir}")
    print(f"    report:     {report}  (open it in a browser: xdg-open {report})")
    return run_dir
