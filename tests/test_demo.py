import json

from codebridge.cli import main

TINY = [
    "train.steps=4",
    "train.batch_size=16",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.progress=false",
    "model.image.width=32",
    "model.image.depth=1",
    "model.image.heads=2",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.bridge.embed_dim=16",
    "model.bridge.fdt.num_tokens=64",
    "model.bridge.fdt.dim=16",
    "prep.text.vocab_size=300",
]


def test_demo_runs_end_to_end(emoji_root, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--minutes", "2", "--data-root", str(emoji_root)]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[4/4] done" in printed and str(out / "report.html") in printed
    retrieval = json.loads((out / "eval" / "retrieval.json").read_text())
    assert retrieval["text_to_image_n_queries"] > 0
    assert 0.0 <= retrieval["text_to_image_R@1"] <= 1.0
    assert "zeroshot_top1" in json.loads((out / "eval" / "zeroshot.json").read_text())
    html = (out / "report.html").read_text()
    assert "<img" in html and "emoji-fdt" in html
    assert (out / "model" / "model.safetensors").is_file()
    for name in ("localization_scene.png", "localization_scene_windows.png"):
        assert (out / "analysis" / name).is_file() and name in html
    localization = json.loads((out / "eval" / "localization.json").read_text())
    assert localization["n_objects"] > 0 and 0.0 <= localization["pointing_game_windows"] <= 1.0
