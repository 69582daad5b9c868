"""Two-process training-step time with gradients all-reduced during the backward pass (DDP, ``train.grad_sync:
overlap``) against the hand-written all-reduce after it (``manual``), gloo on CPU, in the same run.

Writes ``docs/results/ddp.json`` and ``docs/results/ddp.md``. Run (alone on the machine: the two processes take
one core each):

    python benchmarks/ddp_overlap.py

Two processes (``torch.multiprocessing.spawn``, gloo) each build the clip recipe's model once per variant
(identical weights) and a synthetic batch of ``--batch-size``, then time the variants' steps round-robin
(manual, overlap, ...): a load spike hits all of them. A step is ``perf_step.StepRun``: zero the gradients,
the loss through ``GradientSync``, backward, synchronise, clip, AdamW, schedule, ``post_step``. Each timing is
the slower rank's. Variants:

- ``manual``: one flat all-reduce after the backward pass (``average_gradients``).
- ``overlap``: DDP with ``find_unused_parameters``, the trainer's default.
- ``overlap_static``: DDP with ``static_graph`` (no per-step search for unused parameters; unusable with
  accumulation, see ``train/parallel.py``): what the search costs.
- ``allreduce``: the all-reduce of all gradients alone, without a step: the communication there is to hide.

Scales: ``emoji`` (the emoji recipe's towers) and ``quick`` (``perf_step.QUICK_SCALE``: width-384 image tower,
16 M parameters), where communication is a larger share of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codebridge.train.parallel import GradientSync, shutdown_distributed
from perf_measure import interleaved_times, machine, median
from perf_step import QUICK_SCALE, build_runs

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SCALES = {"emoji": [], "quick": QUICK_SCALE}
VARIANTS = {"manual": ("manual", False), "overlap": ("overlap", False), "overlap_static": ("overlap", True)}


def _allreduce(model: torch.nn.Module) -> Callable[[], None]:
    """All-reduce of a flat tensor as large as all the model's gradients."""
    flat = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return lambda: dist.all_reduce(flat)


def _worker(rank: int, init_file: str, overrides: list[str], threads: int, repeats: int, out: str) -> None:
    """One rank: build every variant, time them round-robin, and (rank 0) write the slower rank's timings."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _time_variants(rank, overrides, repeats, out)
    finally:
        shutdown_distributed()  # the variants' DDP wrappers died with _time_variants' frame, as they must


def _time_variants(rank: int, overrides: list[str], repeats: int, out: str) -> None:
    cpu = torch.device("cpu")
    steps: dict[str, Callable[[], None]] = {}
    syncs: list[GradientSync] = []
    try:
        for name, (mode, static_graph) in VARIANTS.items():
            run = build_runs("emoji-clip", overrides, ("clip",), cpu)["clip"]
            run.sync = GradientSync(run.model, mode, static_graph=static_graph)
            syncs.append(run.sync)
            steps[name] = run
        steps["allreduce"] = _allreduce(run.model)
        times = interleaved_times(steps, cpu, repeats, warmup=1)
        slowest = torch.tensor([times[name] for name in steps], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            parameters = sum(p.numel() for p in run.model.parameters())
            result = {
                "seconds": dict(zip(steps, slowest.tolist(), strict=True)),
                "parameters": parameters,
                "gradient_mb": parameters * 4 / 2**20,
                "batch_size_per_process": len(run.batch["index"]),
            }
            Path(out).write_text(json.dumps(result))
    finally:  # an exception's traceback would keep this frame (and the wrappers) alive past the group
        for sync in syncs:
            sync.close()


def measure(overrides: list[str], threads: int, repeats: int) -> dict[str, Any]:
    """Timings of every variant on two gloo processes, with medians and the manual / overlap ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = (str(Path(tmp) / "rendezvous"), overrides, threads, repeats, str(out))
        mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
        result = json.loads(out.read_text())
    seconds = {name: median(t) for name, t in result["seconds"].items()}
    return {
        **result,
        "median_seconds": seconds,
        "manual_over_overlap": seconds["manual"] / seconds["overlap"],
        "find_unused_cost": seconds["overlap"] / seconds["overlap_static"],
    }


def markdown(results: dict[str, Any], meta: dict[str, Any], repeats: int) -> str:
    info = meta["machine"]
    lines = [
        "# DDP overlap: two-process step time, gradients all-reduced during against after the backward pass",
        "",
        f"`{meta['command']}` on {info['cpu']} ({info['cpu_count']} cores), {WORLD} gloo processes of "
        f"{info['torch_threads']} thread(s), torch {info['torch']}, load average {info['load_average_start'][0]:.1f} "
        f"at start, {meta['load_average_end'][0]:.1f} at end.",
        f"Median of {repeats} steps per variant, timed round-robin in one run; each timing is the slower rank's. "
        "Synthetic batches; the clip recipe. Method: benchmarks/ddp_overlap.py.",
        "",
        "| scale | parameters | gradients MB | batch / process | manual s/step | overlap s/step | "
        "overlap static s/step | all-reduce alone s | manual / overlap | find-unused cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scale, r in results.items():
        s = r["median_seconds"]
        lines.append(
            f"| {scale} | {r['parameters'] / 1e6:.1f} M | {r['gradient_mb']:.1f} | {r['batch_size_per_process']} | "
            f"{s['manual']:.3f} | {s['overlap']:.3f} | {s['overlap_static']:.3f} | {s['allreduce']:.4f} | "
            f"{r['manual_over_overlap']:.3f} | {r['find_unused_cost']:.3f} |"
        )
    lines += [
        "",
        "manual / overlap above 1: overlapping saves time. find-unused cost: overlap / overlap static (the per-step",
        "search for unused parameters that accumulation needs).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=SCALES)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per process and step (default 64)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default 7)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "ddp.json")
    args = parser.parse_args(argv)

    command = "python benchmarks/ddp_overlap.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta: dict[str, Any] = {"machine": machine(torch.device("cpu"), args.threads), "command": command.strip()}
    results = {}
    for scale in args.scales:
        overrides = [*SCALES[scale], f"train.batch_size={args.batch_size}", *args.overrides]
        results[scale] = measure(overrides, args.threads, args.repeats)
        s = results[scale]["median_seconds"]
        print(f"{scale}: manual {s['manual']:.3f} s, overlap {s['overlap']:.3f} s per step")
    meta["load_average_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"_meta": meta, **results}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results, meta, args.repeats))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
