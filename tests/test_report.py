"""The run report: built from a real (tiny, untrained) run folder, then opened in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from codebridge.config import Config, ConfigError, save_config
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.data.sources import open_source
from codebridge.eval.run import evaluate_model
from codebridge.models.model import CodeBridgeModel
from codebridge.report import build_report
from codebridge.report.examples import spread, top_hits
from codebridge.report.plots import training_panels, usage_family, usage_panels
from codebridge.report.run import read_run
from codebridge.report.sections import kind_of, split_metrics
from codebridge.report.usage import model_code_usage

torch.set_num_threads(1)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHAPES = ["red square", "blue circle", "green triangle", "yellow star", "purple heart", "orange ring"]
TRICKY = 'a <script>alert("x")</script> & "quoted" cat'  # must reach the page as text, never as markup


def small_config(bridge: str, val: str) -> Config:
    cfg = Config(name="tiny-run")
    cfg.data.train = cfg.data.val = val
    cfg.prep.image.size = 16
    cfg.prep.text.vocab_size = 300
    for enc in (cfg.model.image, cfg.model.text):
        enc.width, enc.depth, enc.heads = 16, 1, 2
    cfg.model.image.patch_size = 8
    bridge_cfg = cfg.model.bridge
    bridge_cfg.name, bridge_cfg.embed_dim = bridge, 8
    bridge_cfg.codebook.size = 12
    bridge_cfg.fdt.num_tokens, bridge_cfg.fdt.dim = 12, 8
    cfg.train.steps = 40
    return cfg


def write_data(folder: Path) -> Path:
    """A CSV of drawn RGBA images, one caption each (the last one full of HTML specials)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["filepath,title"]
    for i, caption in enumerate([*SHAPES, TRICKY]):
        img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        ImageDraw.Draw(img).ellipse((4 + i, 4, 36, 36 - i), fill=(*colour, 255))
        img.save(folder / f"{i}.png")
        rows.append(f'{i}.png,"{caption.replace(chr(34), chr(34) * 2)}"')
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def train_record(step: int, bridge: str) -> dict[str, Any]:
    """A line as the trainer writes it (usage and parts nested), with the bridge's own statistics."""
    parts = {"loss/summary": 2.0 / step, "loss/cmcm": 1.0 / step, "loss/summary/image-text": 2.0 / step}
    parts |= {"logit_scale": 14.0 + step / 10, "grad_norm": 1.0 + 1 / step}
    usage = {"codebook/perplexity": 3.0 + step / 20, "codebook/usage/image": 0.5, "codebook/agreement": 0.1}
    if bridge == "fdt":
        parts = {"loss/contrastive/image-text": 2.0 / step, "logit_scale": 14.0, "fdt/temperature": 1.0}
        usage = {"fdt/image/used": 0.4, "fdt/text/used": 0.5, "fdt/agree/image-text": 0.2}
    return {
        "kind": "train", "step": step, "epoch": 0, "lr": 1e-3 * step / 40, "loss": 3.0 / step, "parts": parts,
        "usage": usage, "samples_per_s": 100.0 + step, "samples_seen": 8 * step, "elapsed_min": step / 100,
    }  # fmt: skip


def make_run(root: Path, bridge: str = "codebook", analysis: bool = True) -> tuple[Path, dict[str, float]]:
    """A run folder as training leaves it, with eval files and analysis artefacts; returns it and eval.json."""
    csv = write_data(root / "data")
    run = root / "run"
    cfg = small_config(bridge, str(csv))
    cfg.output_dir = str(run)
    torch.manual_seed(0)
    texts = [t for s in open_source(str(csv), cfg.data) for t in s.media.get("text", [])]
    model = CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.train(texts, cfg.prep.text)))
    model.save(run / "model")
    save_config(cfg, run / "config.yaml")
    metrics = evaluate_model(model.eval(), str(csv), "retrieval", batch_size=4)
    lines = [train_record(step, bridge) for step in (10, 20, 30, 40)]
    lines.insert(2, {"kind": "eval", "step": 20, "data": str(csv), "metrics": metrics})
    lines.append({"kind": "eval", "step": 40, "data": str(csv), "metrics": metrics})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "eval.json").write_text(json.dumps(metrics))
    (run / "eval").mkdir()
    zeroshot = {"zeroshot_group_top1": 0.25, "zeroshot_group_top5": 0.75, "zeroshot_group_n_classes": 4}
    (run / "eval" / "zeroshot.json").write_text(json.dumps(zeroshot))
    if analysis:
        (run / "analysis").mkdir()
        for name in ("heatmap-red-square.png", "codes-grid.png"):
            Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
                run / "analysis" / name
            )
        pointing = {"pointing_game": 0.625, "random_baseline": 0.21}
        (run / "analysis" / "localization.json").write_text(json.dumps(pointing))
        codes = {"nmi_concept": 0.31, "codes": [{"code": 3, "top_words": ["red", "square"], "purity": 0.5}]}
        (run / "analysis" / "codes.json").write_text(json.dumps(codes))
    return run, metrics


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float], Path]:
    root = tmp_path_factory.mktemp("report")
    run, metrics = make_run(root)
    return run, metrics, build_report(run, queries=3)


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


# ------------------------------------------------------------------------------------------------ content
def test_report_has_every_section_and_is_self_contained(full_run):
    run, _, out = full_run
    assert out == run / "report.html"
    page = out.read_text()
    for anchor in ("summary", "training", "metrics", "examples", "localization", "codes", "usage"):
        assert f'<section id="{anchor}">' in page
    assert "Not computed" not in page  # everything of this run exists
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith(("data:image/", "#")) for link in links)
    assert "<script" not in page and "<link" not in page and "http" not in page.replace("http-equiv", "")


def test_text_is_escaped(full_run):
    page = full_run[2].read_text()
    assert TRICKY not in page  # neither the raw caption ...
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quoted&quot; cat" in page  # ... unescaped


def test_summary_and_metric_tables_show_the_run(full_run):
    run, metrics, out = full_run
    page = out.read_text()
    assert "codebook: 12 shared VQ codes" in page and "tiny-run" in page
    assert "40 of 40" in page  # steps logged of steps planned
    model = CodeBridgeModel.load(run / "model")
    assert f"<td>parameters</td><td>{sum(p.numel() for p in model.parameters()):,}</td>" in page
    r1 = round(100 * metrics["text_to_image_R@1"], 1)
    assert f'<td>text -&gt; image</td><td class="num">{r1:.4g}</td>' in page
    assert '<td>group</td><td class="num">4</td><td class="num">25</td><td class="num">75</td>' in page
    assert "pointing_game" in page and "0.625" in page and "nmi_concept" in page and "square" in page


def test_example_queries_show_top5_with_correct_marks(full_run):
    page = full_run[2].read_text()
    queries = re.findall(r'<div class="query">(.*?)</div></div></div>', page)
    assert len(queries) == 3
    for query in queries:
        hits = re.findall(r'<div class="hit( ok)?"><img src="data:image/png;base64,', query)
        assert len(hits) == 5
        rank = int(re.search(r"correct at rank (\d+)", query)[1])
        marked = [i + 1 for i, ok in enumerate(hits) if ok]
        # one correct image per caption here: it is marked exactly when its rank is in the top 5
        assert marked == ([rank] if rank <= 5 else [])


def test_analysis_images_are_embedded_unchanged(full_run):
    run, _, out = full_run
    page = out.read_text()
    for name in ("heatmap-red-square.png", "codes-grid.png"):
        encoded = base64.b64encode((run / "analysis" / name).read_bytes()).decode()
        assert f"data:image/png;base64,{encoded}" in page


def test_missing_parts_are_named(tmp_path):
    run, _ = make_run(tmp_path, analysis=False)
    for name in ("eval.json", "eval"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    shutil.rmtree(run / "model")
    page = build_report(run, out=tmp_path / "elsewhere" / "r.html").read_text()
    for what in ("end-of-training retrieval", "zero-shot", "example queries", "localization heatmaps",
                 "code-concept grids", "code usage of the model"):  # fmt: skip
        assert f"<strong>Not computed:</strong> {what}" in page
    assert "does not exist yet" in page


def test_bad_metrics_line_names_file_and_line(tmp_path):
    run, _ = make_run(tmp_path, analysis=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 50, "loss": 0.1\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:7: not valid JSON"):
        build_report(run)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        build_report(tmp_path)


def test_broken_analysis_image_is_named(tmp_path):
    run, _ = make_run(tmp_path)
    (run / "analysis" / "heatmap-broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"heatmap-broken\.png: not a readable image"):
        build_report(run)


def test_clip_run_has_no_code_usage(tmp_path):
    run, _ = make_run(tmp_path, bridge="clip", analysis=False)
    page = build_report(run, queries=1).read_text()
    assert "clip: continuous baseline" in page  # the bridge describes itself
    assert "The clip bridge has no shared discrete space" in page
    assert len(re.findall(r'<div class="query">', page)) == 1


# ------------------------------------------------------------------------------------------------ parts
def test_metrics_series_flatten_trainer_and_flat_records(tmp_path):
    run, metrics = make_run(tmp_path, analysis=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 50, "loss": 0.05, "loss/summary": 0.01, "fdt/image/used": 0.3}) + "\n")
    folder = read_run(run)
    assert [s for s, _ in folder.train["loss"]] == [10, 20, 30, 40, 50]
    assert folder.train["loss/summary"][-1] == (50, 0.01)
    assert folder.train["codebook/perplexity"][0] == (10, 3.5)
    assert folder.evals["text_to_image_R@1"] == [(20, metrics["text_to_image_R@1"]), (40, metrics["text_to_image_R@1"])]
    assert "text_to_image_R@1" not in folder.train
    assert folder.last_train["step"] == 50


def test_training_and_usage_panels_group_keys(tmp_path):
    series = {k: [(1, 1.0), (2, 0.5)] for k in train_record(1, "codebook")["parts"]}
    series |= {"loss": [(1, 2.0)], "lr": [(1, 0.1)], "epoch": [(1, 0.0)], "fdt/temperature": [(1, 1.0)]}
    usage = {"codebook/usage/image", "codebook/usage/text", "codebook/perplexity", "toy/used/image"}
    series |= {k: [(1, 0.5)] for k in usage}
    titles = [title for title, _ in training_panels(series, usage)]
    assert titles == ["loss", "loss per modality pair", "learning rate", "logit scale", "fdt/temperature",
                      "grad_norm"]  # fmt: skip
    assert [title for title, _ in usage_panels(series, usage)] == ["perplexity", "usage", "used"]
    assert read_run(make_run(tmp_path, analysis=False)[0]).usage_names == set(train_record(1, "codebook")["usage"])
    assert usage_family("fdt/agree/image-text") == "agree"
    assert usage_family("codebook/agreement") == "agreement"
    assert usage_family("fdt/audio/active") == "active"


def test_split_metrics_and_artefact_kinds():
    retrieval, zeroshot, other = split_metrics(
        {"image_to_text_R@5": 0.5, "text_to_image_median_rank": 2.0, "zeroshot_subgroup_top1": 0.1, "nmi": 0.2}
    )
    assert retrieval == {"image -> text": {"R@5": 0.5}, "text -> image": {"median_rank": 2.0}}
    assert zeroshot == {"subgroup": {"top1": 0.1}} and other == {"nmi": 0.2}
    assert [kind_of(n) for n in ("heatmaps/a.png", "pointing.json", "code_grid.png", "loss.png")] == [
        "localization", "localization", "codes", "other"
    ]  # fmt: skip


def test_top_hits_marks_correct_items_best_first():
    scores = torch.tensor([0.1, 0.9, -0.3, 0.5, 0.7, 0.2, 0.0])
    assert top_hits(scores, {3, 6}, 5) == [
        (1, pytest.approx(0.9), False), (4, pytest.approx(0.7), False), (3, pytest.approx(0.5), True),
        (5, pytest.approx(0.2), False), (0, pytest.approx(0.1), False)
    ]  # fmt: skip
    assert spread(10, 4) == [0, 3, 6, 9] and spread(2, 4) == [0, 1]


@pytest.mark.parametrize("bridge", ["codebook", "fdt"])
def test_model_code_usage_counts_every_input(tmp_path, bridge):
    run, _ = make_run(tmp_path, bridge=bridge, analysis=False)
    folder = read_run(run)
    model = CodeBridgeModel.load(run / "model")
    samples = open_source(folder.config.data.val, folder.config.data)
    usage = model_code_usage(model, samples, batch_size=3)
    assert usage.size == 12 and set(usage.counts) == {"image", "text"}
    if bridge == "codebook":  # every valid token position is assigned one code
        _, mask = model.tokenizer.encode([s.media.get("text", [])[0] for s in samples])
        assert usage.counts["text"].sum() == mask.sum().item()
        assert usage.counts["image"].sum() == len(samples) * (16 // 8) ** 2  # patches per image
    else:  # sparsemax weights of each input sum to one
        assert usage.counts["image"].sum() == pytest.approx(len(samples))
    assert all(1 <= row["perplexity"] <= 12 for row in usage.stats())


# ------------------------------------------------------------------------------------------------ browser
class DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, command: list[str], stderr: Path) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        shell = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        with stderr.open("wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", shell, *command], pass_fds=(to_browser, from_browser), stdout=log, stderr=log
            )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait(self, wanted, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if wanted(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk

    def page_errors(self) -> list[dict[str, Any]]:
        """Uncaught exceptions, console errors/asserts and error log entries seen so far."""
        return [
            e["params"]
            for e in self.events
            if e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


def open_in_chromium(page: Path, tmp_path: Path) -> tuple[list[list], list[dict], bytes, str]:
    """(per image [complete, naturalWidth], console/log errors, PNG screenshot, browser log) of a loaded page."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2000", "--hide-scrollbars", "--remote-debugging-pipe", "about:blank",
    ]  # fmt: skip
    browser = DevTools(command, tmp_path / "chromium.log")
    try:
        target = next(t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        viewport = {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False}
        browser.send("Emulation.setDeviceMetricsOverride", viewport, session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        check = "JSON.stringify(Array.from(document.images, i => [i.complete, i.naturalWidth]))"
        result = browser.send("Runtime.evaluate", {"expression": check, "returnByValue": True}, session=session)
        images = json.loads(result["result"]["value"])
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
    finally:
        browser.close()
    return images, browser.page_errors(), shot, (tmp_path / "chromium.log").read_text(errors="replace")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    page = full_run[2]
    images, errors, shot, log = open_in_chromium(page, tmp_path)
    expected = len(img_sources(page.read_text()))
    assert expected > 20  # figures, thumbnails and analysis images
    assert len(images) == expected, log
    assert all(complete and width > 0 for complete, width in images), images
    assert errors == [], errors
    screenshot = Image.open(io.BytesIO(shot)).convert("RGB")
    if os.environ.get("REPORT_SCREENSHOT"):  # keep it to look at
        screenshot.save(os.environ["REPORT_SCREENSHOT"])
    assert screenshot.size == (1280, 2000)
    pixels = np.asarray(screenshot)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, tables and plots


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_chromium_check_catches_broken_pages(tmp_path):
    """The render check itself can fail: a broken image and a console error are both seen."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA" alt="broken">'
        '<img src="missing.png" alt="missing"><script>console.error("boom")</script></body></html>'
    )
    images, errors, _, _ = open_in_chromium(page, tmp_path)
    assert images == [[True, 0], [True, 0]]
    assert any("boom" in json.dumps(e) for e in errors)
