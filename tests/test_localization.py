import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codebridge.config import Config, ConfigError
from codebridge.data.emoji.suites import load_suite
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.eval.heatmap import frame_strip, heat_array, overlay, save_overlay
from codebridge.eval.localization import (
    code_affinity,
    contrastive_map,
    encode_features,
    patch_boxes,
    position_similarity,
    word_positions,
)
from codebridge.eval.pointing import (
    box_fraction,
    evaluate_localization,
    phrase_maps,
    pointing_game,
    pointing_hit,
    tied_hit,
    unrelated_phrases,
    zoom_target,
)
from codebridge.eval.windows import window_boxes, window_crops, window_maps
from codebridge.localize import localize_cli, speech_units
from codebridge.models.model import CodeBridgeModel

torch.set_num_threads(1)
CAPTIONS = [
    "a dog face left of a red apple and a hot beverage below the red apple",
    "an open hands right of a green circle",
    "a flag: United Nations above a 1st place medal",
]


def tiny_config(bridge: str, context: int = 32) -> Config:
    cfg = Config()
    cfg.prep.image.size = cfg.prep.video.size = 16
    cfg.prep.video.frames = 4
    cfg.prep.text.context_length = context
    cfg.prep.text.vocab_size = 400
    for enc in (cfg.model.image, cfg.model.text):
        enc.width, enc.depth, enc.heads = 16, 1, 2
    cfg.model.image.patch_size = 4
    cfg.model.video.heads = 2
    cfg.model.bridge.name = bridge
    cfg.model.bridge.embed_dim = 8
    cfg.model.bridge.codebook.size = 16
    cfg.model.bridge.fdt.num_tokens, cfg.model.bridge.fdt.dim, cfg.model.bridge.fdt.temperature = 16, 8, 0.5
    return cfg


def tiny_model(bridge: str, texts: list[str], modalities=("image", "text"), context: int = 32) -> CodeBridgeModel:
    cfg = tiny_config(bridge, context)
    torch.manual_seed(0)
    return CodeBridgeModel(cfg, list(modalities), Preprocessors(cfg.prep, Tokenizer.train(texts, cfg.prep.text))).eval()


def random_image(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ pointing game
def test_pointing_hit_uses_the_centre_of_the_maximum_patch() -> None:
    heat = torch.zeros(4, 4)
    heat[1, 2] = 1.0  # patch centre (40, 24) in a 64 x 64 image: patches are 16 px
    assert pointing_hit(heat, (32, 16, 48, 32), (64, 64)) == 1.0
    assert pointing_hit(heat, (36, 20, 44, 28), (64, 64)) == 1.0  # only the centre has to be inside
    assert pointing_hit(heat, (0, 0, 30, 64), (64, 64)) == 0.0
    assert pointing_hit(heat, (41, 0, 64, 64), (64, 64)) == 0.0


def test_ties_share_the_credit_so_a_flat_map_scores_the_patch_chance() -> None:
    flat = torch.zeros(4, 4)
    assert pointing_hit(flat, (0, 0, 32, 32), (64, 64)) == 0.25  # 4 of 16 patch centres
    assert tied_hit(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, False, True])) == 0.5


def test_random_baseline_is_the_mean_box_area_fraction() -> None:
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0  # centre (8, 8)
    boxes = [(0, 0, 32, 32), (48, 48, 64, 64), (0, 0, 64, 6)]
    metrics = pointing_game([heat] * 3, boxes, [(64, 64)] * 3)
    assert metrics["pointing_game"] == pytest.approx(1 / 3)  # only the first box holds (8, 8)
    assert metrics["pointing_game_random"] == pytest.approx((0.25 + 0.0625 + 0.09375) / 3)
    assert metrics["pointing_game_random_patches"] == pytest.approx((4 / 16 + 1 / 16 + 0) / 3)
    assert metrics["n_objects"] == 3
    assert box_fraction((10, 10, 5, 20), (64, 64)) == 0.0  # an empty box


def test_contrastive_map_removes_the_saliency_every_word_shares() -> None:
    # two objects: the caption's map (mean of its words) favours the salient left object for every word; the
    # right object's word adds a smaller bump of its own on the right
    saliency = torch.zeros(4, 4)
    saliency[1, 0] = 2.0
    right_word = saliency.clone()
    right_word[1, 3] = 1.5
    caption = (saliency + right_word) / 2
    box_right = (48, 16, 64, 32)  # holds the centre (56, 24) of patch [1, 3] in a 64 x 64 image
    assert pointing_hit(right_word, box_right, (64, 64)) == 0.0  # the raw word map points at the salient object
    assert pointing_hit(contrastive_map(right_word, caption), box_right, (64, 64)) == 1.0


def test_patch_boxes_cover_the_centre_square_the_model_sees() -> None:
    boxes = patch_boxes((100, 60), 3)  # centre square x 20..80
    assert boxes[0].tolist() == [20, 0, 40, 20]
    assert boxes[-1].tolist() == [60, 40, 80, 60]


# ------------------------------------------------------------------------------------------------ words
@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CAPTIONS * 3, tiny_config("clip").prep.text)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_word_spans_map_to_exactly_their_tokens(tokenizer: Tokenizer, caption: str) -> None:
    ids = tokenizer.encode([caption])[0][0]
    words = [
        "dog face",
        "red apple",
        "hot beverage",
        "open hands",
        "green circle",
        "flag: United Nations",
        "1st place medal",
    ]
    found = [w for w in words if w in caption]
    assert found
    covered = []
    for word in found:
        start = caption.index(word)
        positions = word_positions(tokenizer, caption, (start, start + len(word)))
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert tokenizer.decode(ids[positions]).strip() == tokenizer.normalize(word)
        covered += positions
    assert len(covered) == len(set(covered))


def test_words_past_the_context_are_none_and_bad_spans_fail(tokenizer: Tokenizer) -> None:
    short = Tokenizer.train(CAPTIONS * 3, tiny_config("clip", context=6).prep.text)
    caption = CAPTIONS[0]
    assert word_positions(short, caption, (2, 10)) is not None  # "dog face", early enough
    start = caption.index("hot beverage")
    assert word_positions(short, caption, (start, start + 12)) is None
    with pytest.raises(ValueError, match="span"):
        word_positions(tokenizer, caption, (5, 500))


# ------------------------------------------------------------------------------------------------ bridges
def _pair(model: CodeBridgeModel):
    images = [random_image(seed=i) for i in range(len(CAPTIONS))]
    return encode_features(model, "text", CAPTIONS), encode_features(model, "image", images)


def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Textbook sort-based sparsemax over the last dim, float64."""
    z = z.double()
    top = z.sort(-1, descending=True).values
    ranks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    support = (1 + ranks * top > top.cumsum(-1)).sum(-1, keepdim=True)
    tau = (top.cumsum(-1).gather(-1, support - 1) - 1) / support
    return (z - tau).clamp_min(0)


@torch.no_grad()
def test_fdt_word_map_is_the_word_sparsemax_weights_dotted_with_patch_scores() -> None:
    model = tiny_model("fdt", CAPTIONS)
    text, image = _pair(model)
    sim = position_similarity(model, "text", text, "image", image)
    scores = model.bridge.token_fdt_scores({"text": text, "image": image})
    positions = word_positions(model.tokenizer, CAPTIONS[0], (2, 10))  # "dog face"
    weights = _sparsemax(scores["text"][0, positions])  # [n_tokens, C]
    reference = (weights @ scores["image"][0].double().T).mean(0)  # [patches]
    torch.testing.assert_close(sim[0, positions].mean(0).double(), reference, rtol=1e-5, atol=1e-6)
    assert sim.shape == (3, 32, 16)


@torch.no_grad()
def test_codebook_maps_are_code_posteriors_from_the_bridge_distributions() -> None:
    model = tiny_model("codebook", CAPTIONS)
    text, image = _pair(model)
    outputs = model.bridge({"text": text, "image": image})
    for modality, features in (("text", text), ("image", image)):
        p = torch.softmax(code_affinity(model, modality, features), -1) * features.mask.unsqueeze(-1)
        pooled = p.sum(1) / features.mask.sum(1, keepdim=True)
        torch.testing.assert_close(pooled, outputs[modality].extras["code_probs"], rtol=1e-4, atol=1e-6)
        codes = code_affinity(model, modality, features).argmax(-1).masked_fill(~features.mask, -1)
        assert torch.equal(codes, outputs[modality].extras["codes"])
    sim = position_similarity(model, "text", text, "image", image)
    pt = torch.softmax(code_affinity(model, "text", text), -1)
    pi = torch.softmax(code_affinity(model, "image", image), -1)  # [B, patches, K]
    posterior = pi[1] / pi[1].sum(0)  # p(patch | code)
    torch.testing.assert_close(sim[1, 2], pt[1, 2] @ posterior.T)
    torch.testing.assert_close(sim.sum(-1), torch.ones(3, 32))  # each word's map is a distribution over patches
    back = position_similarity(model, "image", image, "text", text)  # padded words take no share
    assert torch.isinf(back[~text.mask.unsqueeze(1).expand_as(back)]).all()
    torch.testing.assert_close(back.masked_fill(back.isinf(), 0).sum(-1), torch.ones(3, 16))


@torch.no_grad()
def test_clip_compares_projected_tokens_and_masks_padded_targets() -> None:
    model = tiny_model("clip", CAPTIONS)
    text, image = _pair(model)
    sim = position_similarity(model, "text", text, "image", image)
    proj = model.bridge.proj
    expected = torch.cosine_similarity(proj["text"](text.tokens[0, 3]), proj["image"](image.tokens[0, 5]), dim=0)
    torch.testing.assert_close(sim[0, 3, 5], expected)
    back = position_similarity(model, "image", image, "text", text)  # padded words can never be the maximum
    assert torch.isinf(back[~text.mask.unsqueeze(1).expand_as(back)]).all()


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("bridge", ["clip", "codebook", "fdt"])
def test_evaluate_localization_on_built_scenes(emoji_root: Path, bridge: str) -> None:
    scenes = load_suite("emoji-scenes", "train", root=emoji_root)[:12]
    model = tiny_model(bridge, [s.media.get("text", [])[0] for s in scenes])
    metrics = evaluate_localization(model, scenes, batch_size=5)
    objects = [(s.media.get("text", [])[0], o) for s in scenes for o in s.meta["objects"]]
    kept = [o for text, o in objects if word_positions(model.tokenizer, text, o["span"])]
    assert metrics["n_objects"] == len(kept) > 0.8 * len(objects)  # context 32 holds most of the captions
    assert metrics["n_objects_truncated"] == len(objects) - len(kept)
    expected = np.mean([box_fraction(o["box"], (128, 128)) for o in kept])
    assert metrics["pointing_game_random"] == pytest.approx(expected)
    keys = ("caption_map", "contrastive", "phrase", "windows", "random_patches", "phrase_control")
    for key in ("pointing_game", *(f"pointing_game_{k}" for k in keys)):
        assert 0.0 <= metrics[key] <= 1.0


def test_phrase_control_borrows_words_absent_from_the_scene() -> None:
    phrases = [["dog face", "apple"], ["apple", "cat"], ["pizza"]]
    borrowed = unrelated_phrases(phrases)
    assert borrowed == [["cat", "pizza"], ["pizza", "dog face"], ["dog face"]]
    for own, other in zip(phrases, borrowed, strict=True):
        assert len(other) == len(own) and not set(other) & set(own)
    assert unrelated_phrases([["dog face", "apple"]]) is None  # nothing to borrow: no control
    assert unrelated_phrases([["apple"], ["apple"]]) is None


def test_phrase_control_is_the_phrase_game_on_borrowed_words(emoji_root: Path) -> None:
    """The control plays the phrase method's own game with another scene's words; one scene alone has no control."""
    scenes = load_suite("emoji-scenes", "train", root=emoji_root)[:6]
    model = tiny_model("fdt", [s.media.get("text", [])[0] for s in scenes])
    with torch.no_grad():
        metrics = evaluate_localization(model, scenes, batch_size=4)
        assert "pointing_game_phrase_control" not in evaluate_localization(model, scenes[:1])
        images = [model.preprocessors["image"].load(s.media.get("image")) for s in scenes]
        phrases = [[s.media.get("text", [])[0][slice(*o["span"])] for o in s.meta["objects"]] for s in scenes]
        maps = phrase_maps(model, images, unrelated_phrases(phrases))
    kept = [  # the objects the game scores: those whose words fit the context
        (heat, o["box"], image.size)
        for s, image, group in zip(scenes, images, maps, strict=True)
        for o, heat in zip(s.meta["objects"], group, strict=True)
        if word_positions(model.tokenizer, s.media.get("text", [])[0], o["span"])
    ]
    expected = pointing_game(*map(list, zip(*kept, strict=True)))["pointing_game"]
    assert metrics["pointing_game_phrase_control"] == pytest.approx(expected)


def test_phrase_maps_encode_each_word_alone_and_keep_its_image(emoji_root: Path) -> None:
    scenes = load_suite("emoji-scenes", "train", root=emoji_root)[:4]
    model = tiny_model("fdt", [s.media.get("text", [])[0] for s in scenes])
    images = [model.preprocessors["image"].load(s.media.get("image")) for s in scenes]
    phrases = [[s.media.get("text", [])[0][slice(*o["span"])] for o in s.meta["objects"]] for s in scenes]
    with torch.no_grad():
        maps = phrase_maps(model, images, phrases)
        for image, group, found in zip(images, phrases, maps, strict=True):
            assert len(found) == len(group) > 1
            for phrase, heat in zip(group, found, strict=True):  # reference: one phrase and its image at a time
                text, pixels = encode_features(model, "text", [phrase]), encode_features(model, "image", [image])
                sim = position_similarity(model, "text", text, "image", pixels)[0]
                expected = sim[1 : int(text.mask[0].sum()) - 1].mean(0).view(4, 4)
                torch.testing.assert_close(heat, expected)


# ------------------------------------------------------------------------------------------------ windows
def test_windows_are_centred_on_the_patches_and_padded_at_the_border() -> None:
    boxes = window_boxes((60, 40), 2, 0.5)  # centre square x 10..50: patch centres (20, 10), (40, 10), ...
    assert boxes == [(10, 0, 30, 20), (30, 0, 50, 20), (10, 20, 30, 40), (30, 20, 50, 40)]
    corner = window_boxes((32, 32), 4, 0.5)[0]
    assert corner == (-4, -4, 12, 12)
    image = random_image(32, 32)
    crops = window_crops(image, 4, 0.5, (255, 255, 255))
    assert len(crops) == 16 and {c.size for c in crops} == {(16, 16)}
    first = np.asarray(crops[0])
    assert (first[:4] == 255).all() and (first[:, :4] == 255).all()  # outside the image: background
    np.testing.assert_array_equal(first[4:, 4:], np.asarray(image)[:12, :12])
    with pytest.raises(ValueError, match="must be in"):
        window_boxes((32, 32), 4, 0.0)


def test_window_maps_score_each_window_with_the_retrieval_similarity() -> None:
    model = tiny_model("clip", CAPTIONS)
    image = random_image(32, 32, seed=3)
    crops = window_crops(image, 4, 0.5, tuple(model.cfg.prep.image.background))
    windows = model.encode("image", crops)
    queries = torch.cat([model.encode("text", CAPTIONS[:2]), windows[5:6]])
    maps = window_maps(model, image, queries, 4, 0.5)
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps.flatten(1), queries @ windows.T)
    assert maps[2].flatten().argmax() == 5  # a window's own embedding points back at it


def test_zoom_clips_are_scored_against_the_frames_where_the_object_is_large(emoji_root: Path) -> None:
    assert zoom_target("zooming in", 4).tolist() == [False, False, True, True]
    assert zoom_target("zooming out", 5).tolist() == [True, True, False, False, False]
    clips = load_suite("emoji-clips", "train", root=emoji_root)
    model = tiny_model("fdt", [s.media.get("text", [])[0] for s in clips], modalities=("video", "text"))
    metrics = evaluate_localization(model, clips)
    zooms = [c for c in clips if c.meta["motion"].startswith("zooming")]
    assert metrics["n_zoom_clips"] == len(zooms) > 0
    assert metrics["clips_zoom_pointing_random"] == 0.5
    assert 0.0 <= metrics["clips_zoom_pointing"] <= 1.0
    assert "pointing_game" not in metrics


def test_localization_needs_boxes_or_motion() -> None:
    model = tiny_model("clip", CAPTIONS)
    from codebridge.data.sample import Sample

    plain = [Sample(key="0", source="x.csv:2", media={"image": "a.png", "text": ["a dog"]})]
    with pytest.raises(ConfigError, match="emoji-scenes:test"):
        evaluate_localization(model, plain)


# ------------------------------------------------------------------------------------------------ rendering
def test_overlay_png_has_the_input_size_and_heat_sits_on_the_centre_square(tmp_path: Path) -> None:
    image = Image.new("RGB", (60, 40), (255, 255, 255))
    grid = torch.zeros(2, 2)
    grid[0, 0] = 1.0
    path = save_overlay(image, grid, tmp_path / "out" / "heat.png")
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (60, 40)
        pixels = np.asarray(written.convert("RGB")).astype(int)
    assert (pixels[:, :10] == 255).all() and (pixels[:, 50:] == 255).all()  # outside the centre square: untouched
    hot, cold = pixels[2, 12], pixels[37, 47]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where the map is high, blue where low
    heat = heat_array(grid, (60, 40))
    assert np.isnan(heat[:, :10]).all() and np.nanmax(heat) <= 1.0 and np.nanmin(heat) >= 0.0
    assert overlay(image, torch.zeros(2, 2)).size == (60, 40)  # a flat map renders without dividing by zero


def test_frame_strip_has_a_bar_per_frame() -> None:
    frames = [random_image(seed=i) for i in range(3)]
    strip = frame_strip(frames, torch.tensor([0.0, 1.0, 0.5]), height=20, bar=5)
    assert strip.size == (60, 25)
    bars = np.asarray(strip)[22, [10, 30]].astype(int)
    assert bars[1, 0] > bars[0, 0]  # the highest score is the reddest bar
    with pytest.raises(ValueError, match="2 scores"):
        frame_strip(frames, torch.zeros(2))


def test_speech_units_split_the_real_frames_in_time_order() -> None:
    units = speech_units(torch.tensor([True] * 6 + [False] * 2), segments=3)
    assert units == [
        ("whole speech", [0, 1, 2, 3, 4, 5]),
        ("speech part 1/3", [0, 1]),
        ("speech part 2/3", [2, 3]),
        ("speech part 3/3", [4, 5]),
    ]


def test_localize_cli_writes_panels_and_raw_maps(tmp_path: Path) -> None:
    model = tiny_model("fdt", CAPTIONS)
    model.save(tmp_path / "model")
    random_image(40, 30).save(tmp_path / "scene.png")
    result = localize_cli(tmp_path / "model", image=tmp_path / "scene.png", text=CAPTIONS[1], out=tmp_path / "h.png")
    assert result["maps"] == ["whole text", *CAPTIONS[1].split()] and result["skipped"] == []
    with Image.open(result["png"]) as png:
        assert png.format == "PNG"
    raw = json.loads(result["json"].read_text())
    assert np.asarray(raw["maps"][1]["map"]).shape == (4, 4)
    with pytest.raises(ConfigError, match="--image or --video"):
        localize_cli(tmp_path / "model", text="a dog", out=tmp_path / "x.png")
    with pytest.raises(ConfigError, match="cannot localize audio"):
        localize_cli(tmp_path / "model", image=tmp_path / "scene.png", audio=tmp_path / "scene.png")


@pytest.mark.parametrize("method", ["phrases", "windows"])
def test_localize_cli_maps_each_word_alone_with_phrases_and_windows(tmp_path: Path, method: str) -> None:
    model = tiny_model("codebook", CAPTIONS)
    model.save(tmp_path / "model")
    random_image(40, 30).save(tmp_path / "scene.png")
    result = localize_cli(
        tmp_path / "model", image=tmp_path / "scene.png", text="a red apple", out=tmp_path / "h.png", method=method
    )
    assert result["maps"] == ["whole text", "a", "red", "apple"]
    raw = json.loads(result["json"].read_text())
    assert raw["method"] == method and np.asarray(raw["maps"][3]["map"]).shape == (4, 4)
    with pytest.raises(ConfigError, match="--method tokens"):
        localize_cli(tmp_path / "model", video=tmp_path / "scene.png", text="a", method=method)
