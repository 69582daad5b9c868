"""A tiny run of benchmarks/perf.py through every code path, so the benchmark cannot rot between full runs."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import perf  # noqa: E402
from perf_fdt_layer import LayerShape  # noqa: E402
from perf_measure import count_flops, peak_bytes  # noqa: E402

TINY_MODEL = [
    "prep.image.size=16",
    "model.image.patch_size=4",
    "model.image.width=32",
    "model.image.depth=1",
    "model.image.heads=2",
    "prep.text.context_length=8",
    "prep.text.vocab_size=300",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.bridge.embed_dim=16",
    "model.bridge.codebook.size=16",
    "model.bridge.fdt.num_tokens=64",
    "model.bridge.fdt.dim=16",
    "model.bridge.fdt.chunk_size=2",
    "train.batch_size=4",
]


def _captioned_images(folder: Path, n: int = 12) -> Path:
    """A CSV of n small PNGs with captions, in the OpenCLIP layout the CSV source reads."""
    folder.mkdir()
    rows = ["filepath,title"]
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (20, 20), (20 * i, 255 - 20 * i, 128)).save(path)
        rows.append(f"{path},a picture of thing {i}")
    csv = folder / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("perf")
    preset = perf.Preset(
        step_overrides=TINY_MODEL,
        step_repeats=1,
        emoji_overrides=TINY_MODEL,
        layer=LayerShape(batch=4, length=6, tokens=64, dim=16, chunk=2),
        layer_repeats=1,
        loader_overrides=[f"data.train={_captioned_images(root / 'data')}", "train.batch_size=4"],
        retrieval_items=60,
        retrieval_dim=8,
        retrieval_chunk=16,
        matmul_size=64,
        matmul_repeats=3,
    )
    out = root / "results"
    perf.run("tiny", preset, torch.device("cpu"), 1, out, ["(test)"])
    return out, json.loads((out / "perf.json").read_text())


def test_every_headline_figure_is_measured_and_tabled(tiny_run):
    out, results = tiny_run
    table = (out / "perf.md").read_text()
    for key, (_, target, _) in perf.TARGETS.items():
        assert isinstance(results[key], float) and results[key] > 0, key
        assert f"`{key}`" in table
        assert (results["met"][key] is None) == (target is None)
    assert results["fdt_layer_equal"] is True
    assert results["machine"]["load_average_start"] and results["command"].startswith("python benchmarks/perf.py")


def test_raw_measurements_are_consistent(tiny_run):
    _, results = tiny_run
    raw = results["raw"]
    assert set(raw["steps"]["seconds"]) == {"clip", "codebook", "fdt"}
    assert all(flops > 0 for flops in raw["steps"]["flops"].values())
    assert raw["steps"]["flops"]["fdt"] > raw["steps"]["flops"]["clip"]  # the grounding matmuls are counted
    assert results["steps"]["ratio_to_clip"]["clip"] == 1.0
    assert raw["loader"]["warm_epoch"]["samples"] == 12  # 3 full batches of 4
    assert raw["retrieval"]["metrics"]["image_to_text_R@10"] > 10 / 60  # noisy copies: far above chance
    for regime in raw["fdt_layer"]["regimes"].values():
        assert regime["peak_mb"]["naive"] > 0 and regime["peak_mb"]["lean"] > 0


def test_cuda_figures_sit_beside_the_cpu_ones(tiny_run, tmp_path):
    _, results = tiny_run
    path = tmp_path / "perf.json"
    cpu_only = {k: v for k, v in results.items() if k != "cuda"}
    path.write_text(json.dumps(cpu_only))
    merged = perf.merge(path, {**cpu_only, "fdt_step_ratio": 1.01}, torch.device("cuda"))
    assert merged["fdt_step_ratio"] == results["fdt_step_ratio"] and merged["cuda"]["fdt_step_ratio"] == 1.01
    path.write_text(json.dumps(merged))
    again = perf.merge(path, {**cpu_only, "fdt_step_ratio": 2.0}, torch.device("cpu"))
    assert again["fdt_step_ratio"] == 2.0 and again["cuda"]["fdt_step_ratio"] == 1.01  # a CPU run keeps CUDA's
    assert "| figure | CPU | target | met | CUDA | what |" in perf.markdown(again)


def test_peak_bytes_sees_a_freed_temporary_and_ignores_earlier_tensors():
    kept = []

    def work() -> None:
        big = torch.ones(1024, 1024)  # 4 MiB, freed before work returns
        del big
        kept.append(torch.ones(256, 1024))  # 1 MiB, still live after the call

    cpu = torch.device("cpu")
    assert 4 * 2**20 <= peak_bytes(work, cpu) < 5 * 2**20
    assert 4 * 2**20 <= peak_bytes(work, cpu) < 5 * 2**20  # the first call's live MiB is not this call's


def test_flop_count_of_a_sparse_product_counts_its_entries():
    dense = torch.randn(16, 3)
    sparse = torch.eye(8, 16).to_sparse()  # 8 entries
    assert count_flops(lambda: torch.mm(sparse, dense)) == 2 * 8 * 3
    assert count_flops(lambda: sparse.to_dense() @ dense) == 2 * 8 * 16 * 3


def test_bf16_step_benchmark_writes_both_precisions(tmp_path: Path) -> None:
    import bf16_step

    out = tmp_path / "bf16.json"
    assert bf16_step.main(["--bridges", "clip", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    clip = results["clip"]
    assert clip["speedup"] == pytest.approx(clip["seconds"]["fp32"] / clip["seconds"]["bf16"])
    assert len(clip["raw"]["fp32"]) == len(clip["raw"]["bf16"]) == 1
    assert results["_meta"]["command"].startswith("python benchmarks/bf16_step.py")
    assert "| clip |" in out.with_suffix(".md").read_text()


@pytest.mark.slow  # about a minute: five fresh interpreters, so each peak RSS is its own
def test_stream_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/stream.py --small end to end: shard sets, peak RSS runs, loader speed, both resumes."""
    import subprocess

    script = BENCHMARKS / "stream.py"
    command = [sys.executable, str(script), "--small", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True)
    result = json.loads((tmp_path / "stream.json").read_text())
    assert len(result["rss"]) == 3 and all(r["peak_rss_mb"] > 0 for r in result["rss"].values())
    assert result["resume"]["exact"]["same_batches"] and result["resume"]["resampled"]["same_step"]
    assert "python benchmarks/stream.py --small" in (tmp_path / "stream.md").read_text()
