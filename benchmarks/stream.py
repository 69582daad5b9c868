"""Streaming shards: memory bounded by the buffers, throughput against the in-memory loader, exact resume.

Synthetic WebDataset shard sets (image-text at two sizes, image-text-audio at the small size) are written once;
then, each in a fresh process so peak RSS is its own:
- ``rss``: peak RSS (parent + DataLoader workers) of a training run of ``--steps`` steps on each set; the large
  set must stay within 10% of the small one;
- ``speed``: samples/s of the streaming loader against the in-memory loader (``training_loader`` over the same
  samples read into a list) on the small set: same batches, workers and preprocessing, both timed after each
  worker's first batch, best of two alternating rounds (``child_speed``); must be >= 0.9x;
- ``resume``: a stream stopped at a random batch and resumed sees exactly the uninterrupted batches
  (non-resampled), and a resampled one ends its epoch at the same batch.

    python benchmarks/stream.py            # 20k / 200k samples (minutes; do not run on a shared machine)
    python benchmarks/stream.py --small    # seconds: the smoke test's sizes
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import time
import wave
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IT, ITA = "data.modalities=[image, text]", "data.modalities=[image, text, audio]"
MODEL = [
    "prep.image={size: 16, augment: false}",
    "prep.text={context_length: 8, vocab_size: 300}",
    "model.image={patch_size: 4, width: 32, depth: 1, heads: 2}",
    "model.text={width: 32, depth: 1, heads: 2}",
    "model.audio={width: 32, depth: 1, heads: 2}",
    "model.bridge.embed_dim=32",
    "train.progress=false",
    "data.val=null",
]


def _png(rng: random.Random) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), [rng.randrange(256) for _ in range(3)], np.uint8)).save(out, "PNG")
    return out.getvalue()


def _wav(rng: random.Random) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        tone = 0.3 * np.sin(np.arange(3200) * rng.uniform(0.05, 0.2))
        w.writeframes((tone * 32767).astype(np.int16).tobytes())
    return out.getvalue()


def write_set(folder: Path, samples: int, per_shard: int, audio: bool) -> Path:
    """``samples`` image-text(-audio) samples in shards of ``per_shard``; media drawn from a small pool."""
    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(samples)
    images, sounds = [_png(rng) for _ in range(64)], [_wav(rng) for _ in range(16)] if audio else []
    words = ["red", "blue", "green", "small", "large", "circle", "square", "cat", "dog", "tree", "car", "sun"]
    for start in range(0, samples, per_shard):
        with tarfile.open(tmp / f"shard-{start // per_shard:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, samples)):
                members = [("png", images[i % 64]), ("txt", " ".join(rng.sample(words, 3)).encode())]
                members += [("wav", sounds[i % 16])] if audio else []
                for ext, data in members:
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    tmp.rename(folder)
    return folder


def _config(shards: Path, out: Path, *overrides: str) -> Any:
    from codebridge.config import load_config

    return load_config(None, [f"data.train={shards}", f"output_dir={out}", *MODEL, *overrides])


def peak_rss_mb() -> float:
    """This process's peak RSS plus the largest of its finished children's (the DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers) / 1024


def child_rss(shards: Path, out: Path, steps: int, modalities: str) -> dict[str, Any]:
    from codebridge.train import train

    cfg = _config(shards, out, f"train.steps={steps}", "train.batch_size=64", "data.num_workers=2", modalities)
    cfg.train.checkpoint_every = 0
    start = time.perf_counter()
    train(cfg)
    return {"steps": steps, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def samples_per_s(loader: Any, warmup: int, batches: int) -> float:
    """Samples/s over ``batches`` batches after ``warmup`` ones. Why skip some: each worker's first batch pays once
    per epoch (process start, a stream's shuffle-buffer fill), not per sample; once the buffer is full a stream reads
    one sample per sample it hands out, so the timed batches do the same work per sample in both loaders."""
    batches_of = iter(loader)
    for _ in range(warmup):
        next(batches_of)
    seen, start = 0, time.perf_counter()
    for _ in range(batches):
        seen += len(next(batches_of)["index"])
    elapsed = time.perf_counter() - start
    batches_of.close()  # a stream's workers stop here, not while the other loader is timed
    return seen / elapsed


def child_speed(shards: Path, batches: int, batch_size: int, buffer: int, rounds: int = 2) -> dict[str, Any]:
    """Like with like: the same samples, batch size, workers, preprocessing (no decoded cache: data.cache_mb=0)
    and batches timed after the same warm-up; rounds alternate between the loaders and the best of each counts
    (the machine is shared)."""
    from codebridge.data.dataset import all_texts, training_loader
    from codebridge.data.preprocess import Preprocessors, Tokenizer
    from codebridge.data.sources import open_source, source_for
    from codebridge.data.stream import training_stream

    cfg = _config(
        shards,
        Path("unused"),
        f"train.batch_size={batch_size}",
        "data.num_workers=2",
        "data.cache_mb=0",
        f"data.shuffle_buffer={buffer}",
    )
    samples = open_source(cfg.data.train, cfg.data)
    prep = Preprocessors(cfg.prep, Tokenizer.train(all_texts(samples), cfg.prep.text))
    loaders = {
        "in_memory": training_loader(cfg, samples, prep),
        "streaming": training_stream(cfg, source_for(cfg.data.train, cfg.data).shards() or [], prep),
    }
    warmup = cfg.data.num_workers  # each worker's first batch
    if (warmup + batches) * batch_size > len(samples):
        raise ValueError(f"{warmup} + {batches} batches of {batch_size} exceed one epoch of {len(samples)} samples")
    rates: dict[str, float] = {}
    for _ in range(rounds):
        for name, loader in loaders.items():
            rates[name] = max(rates.get(name, 0.0), samples_per_s(loader, warmup, batches))
    return {
        "samples_per_s": rates,
        "ratio": rates["streaming"] / rates["in_memory"],
        "batches": batches,
        "batch_size": batch_size,
        "shuffle_buffer": buffer,
    }


def child_resume(shards: Path) -> dict[str, Any]:
    from codebridge.data.preprocess import Preprocessors, Tokenizer
    from codebridge.data.sources import source_for
    from codebridge.data.stream import training_stream

    def run(loader: Any, n: int) -> list[list[int]]:
        out: list[list[int]] = []
        while len(out) < n:
            for batch in loader:
                out.append(batch["index"].tolist())
                if len(out) == n:
                    break
        return out

    result = {}
    for mode, extra in (("exact", []), ("resampled", ["data.resampled=true", "data.epoch_samples=2048"])):
        cfg = _config(shards, Path("unused"), "train.batch_size=32", "data.num_workers=2", *extra)
        shard_list = source_for(cfg.data.train, cfg.data).shards() or []
        prep = Preprocessors(cfg.prep, Tokenizer.train(["red blue green"], cfg.prep.text))
        stop = random.Random(mode).randrange(5, 60)
        first = training_stream(cfg, shard_list, prep)
        done = run(first, stop)
        resumed = training_stream(cfg, shard_list, prep, batches=stop, saved=first.state())
        if mode == "exact":
            whole = run(training_stream(cfg, shard_list, prep), stop + 20)
            result[mode] = {"stopped_at_batch": stop, "same_batches": done + run(resumed, 20) == whole}
        else:
            per_epoch = 2048 // 32
            rest = sum(1 for _ in resumed)
            result[mode] = {"stopped_at_batch": stop, "epoch_ends_at_batch": stop + rest, "expected": per_epoch}
            result[mode]["same_step"] = stop + rest == per_epoch
    return result


def in_child(job: str, *args: str) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter (its own peak RSS) and return its JSON answer."""
    command = [sys.executable, __file__, "--child", job, *args]
    out = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(result: dict[str, Any], command: str) -> str:
    rss, exact, resampled = result["rss"], result["resume"]["exact"], result["resume"]["resampled"]
    speed = result["speed"]
    lines = [
        "# Streaming shards",
        "",
        f"`{command}` (peak RSS: the trainer plus its largest DataLoader worker; {result['steps']} steps, "
        "batch 64, 2 workers)",
        "",
        "| set | samples | peak RSS (MB) | s |",
        "|---|---|---|---|",
        *(f"| {name} | {r['samples']} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} |" for name, r in rss.items()),
        "",
        f"Large / small peak RSS: {result['rss_ratio']:.3f} (must be <= 1.10).",
        f"Streaming / in-memory samples/s on the small set: {speed['ratio']:.2f} "
        f"({speed['samples_per_s']['streaming']:.0f} / {speed['samples_per_s']['in_memory']:.0f};"
        f" must be >= 0.9; {speed['batches']} batches of {speed['batch_size']} after each worker's first, best of 2 "
        f"rounds, shuffle buffer {speed['shuffle_buffer']}).",
        f"Exact resume after batch {exact['stopped_at_batch']}: "
        f"{'same batches' if exact['same_batches'] else 'DIFFERENT batches'}; resampled resume after batch "
        f"{resampled['stopped_at_batch']} ends the epoch at batch {resampled['epoch_ends_at_batch']} "
        f"(expected {resampled['expected']}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smoke sizes (seconds)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/codebridge-stream-bench"), help="shard sets")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="stream.json/.md go here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job, *rest = args.child
        if job == "rss":
            answer = child_rss(Path(rest[0]), Path(rest[1]), int(rest[2]), rest[3])
        elif job == "speed":
            answer = child_speed(Path(rest[0]), *map(int, rest[1:4]))
        else:
            answer = child_resume(Path(rest[0]))
        print(json.dumps(answer))
        return
    small, large, steps, batches = (512, 2048, 4, 4) if args.small else (20_000, 200_000, 200, 150)
    # speed: batches timed, their size, the stream's shuffle buffer (the default; small: an eighth of a worker's data)
    timed, batch_size, buffer = (24, 16, 32) if args.small else (batches, 64, 1000)
    per_shard = 128 if args.small else 1000
    sets = {  # name -> (folder, samples, modalities)
        f"image-text {small}": (write_set(args.work / f"it-{small}", small, per_shard, False), small, IT),
        f"image-text {large}": (write_set(args.work / f"it-{large}", large, per_shard, False), large, IT),
        f"image-text-audio {small}": (write_set(args.work / f"ita-{small}", small, per_shard, True), small, ITA),
    }
    rss = {}
    for name, (folder, samples, modalities) in sets.items():
        run_dir = args.work / f"run-{zlib.crc32(name.encode())}-{time.time_ns()}"
        rss[name] = {"samples": samples, **in_child("rss", str(folder), str(run_dir), str(steps), modalities)}
    result = {
        "small": args.small,
        "steps": steps,
        "rss": rss,
        "rss_ratio": rss[f"image-text {large}"]["peak_rss_mb"] / rss[f"image-text {small}"]["peak_rss_mb"],
        "speed": in_child("speed", str(sets[f"image-text {small}"][0]), *map(str, (timed, batch_size, buffer))),
        "resume": in_child("resume", str(sets[f"image-text {small}"][0])),
    }
    command = "python benchmarks/stream.py" + (" --small" if args.small else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "stream.md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
