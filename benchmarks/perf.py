"""Performance benchmark (issue 6): what the discrete bridges, the loader and retrieval evaluation cost.

Writes ``docs/results/perf.json`` (flat headline keys, targets, raw timings, shapes, machine, command) and
``docs/results/perf.md`` (the table with the target beside each figure). Every figure is a ratio of two
measurements taken in the same run; the CPU figures are the ones the targets apply to. Run:

    python benchmarks/perf.py                 # CPU, paper-scale sizes (about 13 minutes on 1 thread)
    python benchmarks/perf.py --quick         # smaller sizes, written to runs/perf-quick/
    python benchmarks/perf.py --device cuda   # the same on a GPU, stored under "cuda" beside the CPU figures

See docs/performance.md for what each figure measures and how.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perf_fdt_layer import LayerShape, run_fdt_layer
from perf_loader import run_loader
from perf_measure import machine, matmul_times, median
from perf_retrieval import run_retrieval
from perf_step import PAPER_SCALE, QUICK_SCALE, run_steps, step_figures

ROOT = Path(__file__).resolve().parents[1]
EMOJI_RECIPE = str(ROOT / "configs" / "emoji-clip.yaml")

# headline key -> (comparison, target, what it is)
TARGETS: dict[str, tuple[str, float | None, str]] = {
    "fdt_step_ratio": ("<=", 1.15, "training step, fdt (C=16384) / clip, same encoders and batch"),
    "codebook_step_ratio": ("<=", 1.10, "training step, codebook (K=1024) / clip, same encoders and batch"),
    "fdt_layer_speedup": (">=", 3.0, "FDT layer forward+backward, naive time / lean time"),
    "fdt_layer_memory_ratio": ("<=", 1 / 8, "FDT layer forward+backward, lean peak / naive peak"),
    "mfu": (">=", 0.40, "model FLOP/s of a training step / fp32 matmul FLOP/s (lowest of the three bridges)"),
    "loader_ratio": (">=", 3.0, "loader samples/s / samples/s the emoji recipe's clip step consumes"),
    "retrieval_100k_seconds": ("", None, "retrieval evaluation, both directions, N x N items"),
    "retrieval_100k_peak_mb": ("", None, "its peak memory above the embeddings"),
}


@dataclass
class Preset:
    """Every size the benchmark uses; ``full`` is what the targets apply to."""

    step_overrides: list[str] = field(default_factory=lambda: [*PAPER_SCALE, "train.batch_size=32"])
    step_repeats: int = 3
    emoji_recipe: str = EMOJI_RECIPE
    emoji_overrides: list[str] = field(default_factory=list)
    layer: LayerShape = field(default_factory=LayerShape)
    layer_repeats: int = 3
    loader_overrides: list[str] = field(default_factory=lambda: ["data.train=emoji-style:train"])
    retrieval_items: int = 100_000
    retrieval_dim: int = 512
    retrieval_chunk: int = 4096  # EvalConfig.chunk_size's default
    matmul_size: int = 4096
    matmul_repeats: int = 5


PRESETS = {
    "full": Preset(),
    "quick": Preset(
        step_overrides=[*QUICK_SCALE, "train.batch_size=16"],
        step_repeats=2,
        layer=LayerShape(batch=64),
        layer_repeats=2,
        retrieval_items=20_000,
        matmul_size=2048,
    ),
}


def measure(preset: Preset, device: torch.device) -> dict[str, Any]:
    """Run every part; returns the raw measurements, keyed by part."""
    raw: dict[str, Any] = {}
    started = time.perf_counter()
    raw["matmul"] = {"size": preset.matmul_size, "seconds": matmul_times(device, preset.matmul_size, 2)}
    raw["steps"] = run_steps(None, preset.step_overrides, ("clip", "codebook", "fdt"), device, preset.step_repeats)
    raw["emoji_step"] = run_steps(preset.emoji_recipe, preset.emoji_overrides, ("clip",), device, preset.step_repeats)
    raw["fdt_layer"] = run_fdt_layer(preset.layer, device, preset.layer_repeats)
    raw["loader"] = run_loader(preset.emoji_recipe, preset.loader_overrides, device)
    raw["retrieval"] = run_retrieval(preset.retrieval_items, preset.retrieval_dim, preset.retrieval_chunk, device)
    # the matmul reference is taken at both ends of the run, so a change of load during it shows in its spread
    raw["matmul"]["seconds"] += matmul_times(device, preset.matmul_size, preset.matmul_repeats - 2)
    raw["seconds_total"] = time.perf_counter() - started
    return raw


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios from the raw measurements."""
    size = raw["matmul"]["size"]
    matmul_flops = 2 * size**3 / median(raw["matmul"]["seconds"])
    steps = step_figures(raw["steps"], matmul_flops)
    emoji = step_figures(raw["emoji_step"], matmul_flops)
    layer = raw["fdt_layer"]["regimes"]["init"]
    return {
        "fdt_step_ratio": steps["ratio_to_clip"]["fdt"],
        "codebook_step_ratio": steps["ratio_to_clip"]["codebook"],
        "fdt_layer_speedup": layer["speedup"],
        "fdt_layer_memory_ratio": layer["memory_ratio"],
        "fdt_layer_equal": layer["equal"]["all_equal"],
        "mfu": min(steps["mfu"].values()),
        "loader_ratio": raw["loader"]["samples_per_s"] / emoji["samples_per_s"]["clip"],
        "retrieval_100k_seconds": raw["retrieval"]["seconds"],
        "retrieval_100k_peak_mb": raw["retrieval"]["peak_mb"],
        "matmul_flops_per_s": matmul_flops,
        "steps": steps,
        "emoji_step": emoji,
        "loader_ratio_to_paper_scale_step": raw["loader"]["samples_per_s"] / steps["samples_per_s"]["clip"],
        "fdt_layer_sparse_speedup": raw["fdt_layer"]["regimes"]["sparse"]["speedup"],
        "fdt_layer_sparse_memory_ratio": raw["fdt_layer"]["regimes"]["sparse"]["memory_ratio"],
    }


def met(key: str, value: float) -> bool | None:
    comparison, target, _ = TARGETS[key]
    if target is None:
        return None
    return value <= target if comparison == "<=" else value >= target


def record(preset_name: str, preset: Preset, device: torch.device, threads: int, argv: list[str]) -> dict[str, Any]:
    info = machine(device, threads)
    raw = measure(preset, device)
    info["load_average_end"] = list(os.getloadavg())
    result = figures(raw)
    result["met"] = {key: met(key, result[key]) for key in TARGETS}
    result["targets"] = {key: {"compare": c, "target": t, "what": w} for key, (c, t, w) in TARGETS.items()}
    result["preset"] = {"name": preset_name, **dataclasses.asdict(preset)}
    result["machine"] = info
    result["torch"] = torch.__version__
    result["command"] = " ".join(["python", "benchmarks/perf.py", *map(shlex.quote, argv)])
    result["raw"] = raw
    return result


def merge(path: Path, result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """CPU figures at the top level, CUDA figures under "cuda"; a run replaces only its own device's part."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    if device.type == "cuda":
        return {**old, "cuda": result}
    return {**result, **({"cuda": old["cuda"]} if "cuda" in old else {})}


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "not measured"
    if key == "mfu":
        return f"{value:.1%}"
    if key.endswith("memory_ratio"):
        return f"{value:.3f} (1/{1 / value:.1f})"
    if key.endswith("_mb"):
        return f"{value:,.0f} MB"
    if key.endswith("_seconds"):
        return f"{value:,.1f} s"
    return f"{value:.2f}x"


def _target(key: str) -> str:
    comparison, target, _ = TARGETS[key]
    if target is None:
        return "(reported)"
    return f"{comparison} {_fmt(key, target)}"


def _cache(loader: dict[str, Any]) -> str:
    """The loader's decoded cache as recorded: a byte budget, or (runs before data.cache_mb) on/off."""
    if "cache_mb" in loader:
        return f"cache {loader['cache_mb']:g} MiB"
    return f"cache {'on (unbounded)' if loader.get('cache') else 'off'}"


def markdown(results: dict[str, Any]) -> str:
    """One row per headline figure: CPU (the targets apply to it) and, when measured, CUDA beside it."""
    runs = {name: part for name, part in (("CPU", results), ("CUDA", results.get("cuda"))) if part and "met" in part}
    lines = ["# Performance (issue 6)", "", "Method and discussion: docs/performance.md.", ""]
    for name, part in runs.items():
        info = part["machine"]
        lines.append(
            f"- {name}: `{part['command']}` on {info.get('gpu', info['cpu'])}, {info['torch_threads']} torch "
            f"thread(s), torch {part['torch']}, load average {info['load_average_start'][0]:.1f} at start, "
            f"{info['load_average_end'][0]:.1f} at end, {part['raw']['seconds_total'] / 60:.1f} minutes."
        )
    # the targets apply to the CPU figures; CUDA figures are reported beside them without a verdict
    columns = [f"{name} | target | met" if name == "CPU" else name for name in runs]
    lines += ["", "| figure | " + " | ".join(columns) + " | what |"]
    lines.append("|---|" + "---|" * (sum(c.count("|") + 1 for c in columns) + 1))
    for key, (_, _, what) in TARGETS.items():
        cells = []
        for name, part in runs.items():
            figure = _fmt(key, part[key])
            verdict = {True: "yes", False: "**no**", None: ""}[part["met"][key]]
            cells.append(f"{figure} | {_target(key)} | {verdict}" if name == "CPU" else figure)
        lines.append(f"| `{key}` | " + " | ".join(cells) + f" | {what} |")
    for name, part in runs.items():
        lines += ["", f"## {name} details", "", *details(part)]
    return "\n".join(lines) + "\n"


def details(part: dict[str, Any]) -> list[str]:
    """The per-bridge step table and the FDT layer's two regimes."""
    steps, raw = part["steps"], part["raw"]
    lines = [
        f"Training steps, batch {raw['steps']['batch_size']} (`{' '.join(part['preset']['step_overrides'])}`):",
        "",
        "| bridge | parameters | step s (median) | / clip | samples/s | model FLOP/step | FLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seconds in raw["steps"]["seconds_median"].items():
        lines.append(
            f"| {name} | {raw['steps']['parameters'][name] / 1e6:.1f} M | {seconds:.2f} | "
            f"{steps['ratio_to_clip'][name]:.3f} | {steps['samples_per_s'][name]:.1f} | "
            f"{raw['steps']['flops'][name] / 1e9:.0f} G | {steps['flops_per_s'][name] / 1e9:.1f} G | "
            f"{steps['mfu'][name]:.1%} |"
        )
    layer = raw["fdt_layer"]
    lines += [
        "",
        f"FDT layer {layer['shape']}:",
        "",
        "| regime | temperature | support (mean, max) | naive s | lean s | speedup | naive MB | lean MB | lean/naive"
        " memory | equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in layer["regimes"].items():
        t, m = r["seconds_median"], r["peak_mb"]
        lines.append(
            f"| {name} | {r['temperature']:g} | {r['support_mean']:.0f}, {r['support_max']:.0f} | {t['naive']:.2f} | "
            f"{t['lean']:.2f} | {r['speedup']:.2f}x | {m['naive']:,.0f} | {m['lean']:,.0f} | "
            f"{r['memory_ratio']:.3f} | {r['equal']['all_equal']} |"
        )
    loader, emoji = raw["loader"], part["emoji_step"]
    retrieval = raw["retrieval"]
    lines += [
        "",
        f"Loader: {loader['spec']} ({loader['items']} items, batch {loader['batch_size']}, "
        f"{loader['num_workers']} workers, {_cache(loader)}): "
        f"{loader['samples_per_s']:.0f} samples/s warm "
        f"(first epoch {loader['cold_epoch']['samples'] / loader['cold_epoch']['seconds']:.0f}); the emoji recipe's "
        f"clip step consumes {emoji['samples_per_s']['clip']:.0f} samples/s, the paper-scale clip step "
        f"{steps['samples_per_s']['clip']:.1f}.",
        "",
        f"Retrieval: {retrieval['items']:,} x {retrieval['items']:,} items, dim {retrieval['dim']}, chunk "
        f"{retrieval['chunk_size']}, both directions: {retrieval['seconds']:.1f} s, "
        f"peak {retrieval['peak_mb']:,.0f} MB above the {retrieval['inputs_mb']:,.0f} MB of embeddings.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (not comparable with the targets)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default docs/results)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    name = "quick" if args.quick else "full"
    out = args.out or (ROOT / "runs" / "perf-quick" if args.quick else ROOT / "docs" / "results")
    run(name, PRESETS[name], torch.device(args.device), args.threads, out, argv)
    return 0


def run(name: str, preset: Preset, device: torch.device, threads: int, out: Path, argv: list[str]) -> dict[str, Any]:
    """Measure on ``threads`` torch threads, then write ``perf.json`` and ``perf.md`` into ``out``; returns them."""
    torch.set_num_threads(threads)
    result = record(name, preset, device, threads, argv)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "perf.json"
    merged = merge(path, result, device)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    (out / "perf.md").write_text(markdown(merged))
    return merged


if __name__ == "__main__":
    sys.exit(main())
