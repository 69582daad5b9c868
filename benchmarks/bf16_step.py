"""bf16 autocast against fp32 on this machine: the training-step time of each emoji recipe (its own encoders and
bridge settings, batch 256, a synthetic batch), fp32 and bf16 timed round-robin in one run.

Writes ``docs/results/bf16.json`` and ``docs/results/bf16.md``. Run:

    python benchmarks/bf16_step.py --threads 2

The figure is fp32 seconds / bf16 seconds per bridge: above 1, bf16 buys more steps in a time budget. It depends on
the CPU (native bfloat16 or not: docs/training.md), so the machine's bf16 flags are recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from perf_measure import interleaved_times, machine, median
from perf_step import StepRun, build_runs

ROOT = Path(__file__).resolve().parents[1]
BRIDGES = ("clip", "codebook", "fdt")


def in_bf16(step: StepRun) -> Callable[[], None]:
    """The same step under CPU bf16 autocast; only the forward's ops are autocast, as ``train.precision=bf16``."""

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()

    return run


def cpu_bf16_flags() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return sorted({f for f in flags if "bf16" in f})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bridges", nargs="+", default=list(BRIDGES), choices=BRIDGES)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (default 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bf16.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict = {}
    for bridge in args.bridges:
        step = build_runs(f"emoji-{bridge}", [], (bridge,), torch.device("cpu"))[bridge]  # the recipe as it is
        times = interleaved_times({"fp32": step, "bf16": in_bf16(step)}, torch.device("cpu"), args.repeats)
        seconds = {name: median(t) for name, t in times.items()}
        results[bridge] = {"seconds": seconds, "speedup": seconds["fp32"] / seconds["bf16"], "raw": times}
        print(f"{bridge}: fp32 {seconds['fp32']:.3f} s, bf16 {seconds['bf16']:.3f} s per step")
    command = "python benchmarks/bf16_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {
        "machine": machine(torch.device("cpu"), args.threads),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "command": command,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"_meta": meta, **results}, indent=2))
    lines = [
        "# bf16 autocast against fp32: training-step time of the emoji recipes",
        "",
        f"`{command}` on {meta['machine']['cpu']}, {args.threads} threads,",
        f"bf16 CPU flags: {', '.join(meta['cpu_bf16_flags']) or 'none'}.",
        f"Median of {args.repeats} steps each, fp32 and bf16 timed round-robin; synthetic batch of the recipe's size.",
        "",
        "| bridge | fp32 s/step | bf16 s/step | fp32 / bf16 |",
        "|---|---|---|---|",
        *(
            f"| {b} | {r['seconds']['fp32']:.3f} | {r['seconds']['bf16']:.3f} | {r['speedup']:.2f} |"
            for b, r in results.items()
        ),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
