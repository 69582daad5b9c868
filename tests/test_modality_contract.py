"""The modality extension point: a toy modality defined in this file only (a depth map stored as .npy, with its own
tiny encoder) trains, saves, loads, evaluates and reports with text without touching a library file; and every
registered modality (built-in and the toy) keeps the same contract.

The toy is registered only while this module's tests run: a registered modality adds its sections to every config
saved, which a process without it (another test's worker) would refuse as unknown keys."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch import nn

import codebridge
from codebridge.config import Config, ConfigError, broken, load_config, num, to_dict
from codebridge.data.dataset import SampleDataset, collate, decode
from codebridge.data.modalities import MODALITIES, Modality, modality, modality_names, register_modality
from codebridge.data.modalities.source import DecodeError, Source, as_file, decoding
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.data.sample import BadSampleError, Sample
from codebridge.eval.run import evaluate_model
from codebridge.models.encoders import ENCODERS
from codebridge.models.features import Features
from codebridge.models.model import CodeBridgeModel
from codebridge.report import build_report
from codebridge.train import train
from helpers import small_config
from test_model import write_video

torch.set_num_threads(1)
CAPTIONS = ["a deep hole", "a flat table", "a ramp going up", "a bump in the middle"]


# ------------------------------------------------------------------------------------------------ the toy modality
@dataclass
class DepthPrep:
    size: int = num(8, ge=2)  # depth maps are cropped/padded to size x size
    max_depth: float = num(10.0, gt=0)  # metres mapped to 1.0

    def check(self) -> list[str]:
        return broken({"{size} must be even (2x2 patches)": self.size % 2 == 0})


class DepthProcessor:
    def __init__(self, prep: DepthPrep) -> None:
        self.prep = prep

    def decode(self, src: Source) -> np.ndarray:
        with decoding("depth", src):
            file = as_file(src)
            depth = np.load(file, allow_pickle=False)
            if depth.ndim != 2 or not np.isfinite(depth).all():
                raise DecodeError(f"must be a finite 2-D array, got shape {depth.shape}")
            return depth.astype(np.float32)

    def from_user(self, item: Any) -> np.ndarray:
        return np.asarray(item, dtype=np.float32) if isinstance(item, np.ndarray) else self.decode(item)

    def entry(self, raw: np.ndarray, train: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        s = self.prep.size
        out = torch.zeros(s, s)
        crop = torch.from_numpy(raw[:s, :s]) / self.prep.max_depth
        out[: crop.shape[0], : crop.shape[1]] = crop
        if train:
            out = out + 0.01 * torch.randn(out.shape, generator=generator)
        rows = torch.zeros(s, dtype=torch.bool)
        rows[: min(s, raw.shape[0])] = True  # rows past the map are padding
        return {"depth": out, "mask": rows}


class DepthModality(Modality):
    name = "depth"
    extensions = ("npy",)
    prep = DepthPrep
    encoder = "toy_depth"

    def processor(self, prep: Any, tokenizer: Tokenizer | None) -> DepthProcessor:
        return DepthProcessor(prep.depth)

    def thumbnail(self, raw: np.ndarray) -> Image.Image:
        grey = (255 * raw / max(float(raw.max()), 1e-6)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")

    def rules(self, cfg: Config) -> dict[str, bool]:
        return {"{model.depth.width} must be at least {prep.depth.size}": cfg.model.depth.width >= cfg.prep.depth.size}


@dataclass
class DepthEncoderConfig:
    width: int = num(16, ge=1)


class DepthEncoder(nn.Module):
    """Each row of the map is a position: a linear map of its values, then a masked mean."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.width = cfg.model.depth.width
        self.rows = nn.Linear(cfg.prep.depth.size, self.width)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        tokens, mask = self.rows(inputs["depth"]), inputs["mask"]
        summary = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return Features(tokens=tokens, mask=mask, summary=summary)


@pytest.fixture(autouse=True, scope="module")
def toy_registered() -> Iterator[None]:
    register_modality(DepthModality)
    ENCODERS.register("toy_depth", config=DepthEncoderConfig)(DepthEncoder)
    yield
    MODALITIES.remove("depth")
    ENCODERS.remove("toy_depth")


NAMES = [*modality_names(), "depth"]  # every registered modality and the toy


def write_depth_data(root: Path, count: int = 8) -> Path:
    """A JSONL of depth maps (different heights, so batches pad) with captions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        np.save(root / f"d{i}.npy", rng.uniform(0, 10, (5 + i % 4, 8)).astype(np.float32))
        rows.append({"depth": f"d{i}.npy", "text": CAPTIONS[i % len(CAPTIONS)] + f" {i}", "labels": {"c": i % 4}})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


# ------------------------------------------------------------------------------------------------ end to end
def test_a_modality_defined_here_trains_saves_loads_evaluates_and_reports(tmp_path: Path) -> None:
    data = write_depth_data(tmp_path / "data")
    cfg = load_config(
        None,
        [
            f"data.train={data}",
            f"data.val={data}",
            "data.modalities=[depth, text]",
            f"output_dir={tmp_path / 'run'}",
            "prep.depth.size=6",
            "prep.text={context_length: 12, vocab_size: 300}",
            "model.depth.width=16",
            "model.text={width: 16, depth: 1, heads: 2}",
            "model.bridge.embed_dim=8",
            "train={batch_size: 4, steps: 4, warmup_steps: 1, log_every: 2, progress: false}",
        ],
    )
    assert to_dict(cfg)["prep"]["depth"] == {"size": 6, "max_depth": 10.0}
    run = train(cfg)
    model = codebridge.load(run / "model")
    assert isinstance(model.encoders["depth"], DepthEncoder) and model.cfg.prep.depth.size == 6
    maps = [np.load(data.parent / f"d{i}.npy") for i in range(2)]
    assert model.encode("depth", maps).shape == (2, 8)
    retrieval = evaluate_model(model, str(data), "retrieval", batch_size=4)
    assert 0 <= retrieval["text_to_depth_R@1"] <= 1 and 0 <= retrieval["depth_to_text_R@1"] <= 1
    page = build_report(run, queries=1).read_text()
    assert "depth encoder" in page and "encoder &#x27;toy_depth&#x27;" in page


def test_the_toy_modality_config_is_validated_like_the_built_in_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^prep\.depth\.size: 1 is out of range; expected an integer >= 2$"):
        load_config(None, ["prep.depth.size=1"])
    with pytest.raises(ConfigError, match=r"prep\.depth\.size=7 must be even"):
        load_config(None, ["prep.depth.size=7"])
    with pytest.raises(ConfigError, match=r"prep\.depth: unknown key\(s\) colour; allowed: size, max_depth"):
        load_config(None, ["prep.depth.colour=1"])
    with pytest.raises(ConfigError, match=r"model\.depth\.width=4 must be at least prep\.depth\.size=8"):
        load_config(None, ["data.modalities=[depth, text]", "model.depth.width=4"])
    load_config(None, ["model.depth.width=4"])  # the rule holds only for runs that use depth


def test_an_unknown_modality_is_named_with_the_registered_ones(tmp_path: Path) -> None:
    registered = r"expected one of image, text, audio, video, depth"
    with pytest.raises(ConfigError, match=rf"^data\.modalities: 'smell' is not a registered modality; {registered}"):
        load_config(None, ["data.modalities=[smell, text]"])
    with pytest.raises(ConfigError, match=r"^prep: unknown key\(s\) smell; allowed: image, text, audio, video, depth"):
        load_config(None, ["prep.smell.size=1"])
    cfg = small_config()
    prep = Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text))
    samples = [Sample("a", "t.csv:2", {"text": ["x"]})]
    with pytest.raises(ConfigError, match=rf"data\.modalities: 'smell' is not a registered modality; {registered}"):
        SampleDataset(samples, ["smell"], prep, train=False)
    with pytest.raises(ConfigError, match=rf"batch: 'smell' is not a registered modality; {registered}"):
        collate([{"index": 0, "labels": {}, "smell": {"x": torch.zeros(1)}}])


# ------------------------------------------------------------------------------------------------ the contract
@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """Two good references of every registered modality, of different lengths where a modality pads."""
    root = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    refs: dict[str, list[Any]] = {"text": [["a red square"], ["blue", "a longer blue caption here"]]}
    refs["image"], refs["audio"], refs["video"], refs["depth"] = [], [], [], []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        sf.write(root / f"{i}.wav", rng.standard_normal(2000 + 1500 * i).astype(np.float32) * 0.1, 8000)
        write_video(root / f"{i}.mp4", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        np.save(buffer, rng.uniform(0, 10, (3 + 3 * i, 8)).astype(np.float32))
        refs["image"].append(str(root / f"{i}.png"))
        refs["audio"].append(str(root / f"{i}.wav"))
        refs["video"].append(str(root / f"{i}.mp4"))
        refs["depth"].append(buffer.getvalue())  # bytes, as from a shard
    return refs


def contract_setup() -> tuple[Config, Preprocessors]:
    cfg = small_config()
    cfg.model.depth.width = 16
    return cfg, Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS * 3, cfg.prep.text))


def test_every_registered_modality_is_covered(references: dict[str, list[Any]]) -> None:
    assert modality_names() == NAMES and set(NAMES) == set(references)


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_reference_is_a_named_bad_sample(name: str, tmp_path: Path) -> None:
    _, prep = contract_setup()
    bad: Any = [] if name == "text" else b"\x00not a real file\xff" * 4
    with pytest.raises(BadSampleError, match=r"^data\.csv:7: "):
        decode(prep, Sample("k", "data.csv:7", {name: bad}), name)
    if modality(name).extensions:
        with pytest.raises(BadSampleError, match=r"does not exist"):
            decode(
                prep, Sample("k", "data.csv:8", {name: str(tmp_path / f"missing.{modality(name).extensions[0]}")}), name
            )


@pytest.mark.parametrize("name", NAMES)
def test_collate_pads_and_masks_and_the_encoder_keeps_its_contract(name: str, references: dict[str, list[Any]]) -> None:
    cfg, prep = contract_setup()
    spec, processor = modality(name), prep[name]
    entries = [processor.entry(processor.decode(ref), train=False) for ref in references[name]]
    batch = spec.collate(entries)
    assert set(batch) == set(entries[0])
    for key, value in batch.items():
        assert value.shape[0] == 2
        longest = max(e[key].shape[0] for e in entries) if entries[0][key].ndim else None
        if longest is not None:
            assert value.shape[1] == longest  # right-padded to the longest item
            for row, e in enumerate(entries):  # each item unchanged in its own part, zeros (False) after
                assert torch.equal(value[row, : e[key].shape[0]], e[key])
                assert not value[row, e[key].shape[0] :].any()
    finished = spec.on_device(batch, cfg.prep)  # what the model does on its device before the encoder
    for key, value in spec.on_device(finished, cfg.prep).items():  # and only once: a finished entry stays as it is
        assert torch.equal(value, finished[key])
    torch.manual_seed(0)
    encoder = spec.build_encoder(cfg, prep).eval()
    with torch.no_grad():
        together = encoder(finished)
        alone = [encoder(spec.on_device(spec.collate([e]), cfg.prep)) for e in entries]
    assert together.tokens.shape[:2] == together.mask.shape and together.tokens.shape[2] == encoder.width
    assert together.summary.shape == (2, encoder.width) and together.mask.dtype == torch.bool
    for row, single in enumerate(alone):  # padding never changes an item's summary
        torch.testing.assert_close(together.summary[row], single.summary[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_and_report_thumbnail(name: str, references: dict[str, list[Any]], tmp_path: Path) -> None:
    cfg, prep = contract_setup()
    cfg.data.modalities = [name] if name == "text" else [name, "text"]
    torch.manual_seed(0)
    model = CodeBridgeModel(cfg, cfg.data.modalities, prep)
    loaded = CodeBridgeModel.load(model.save(tmp_path / "model"))
    assert loaded.cfg == model.cfg and loaded.cfg.prep == cfg.prep
    items = [prep[name].decode(ref) for ref in references[name]]
    items = [item[0] for item in items] if name == "text" else items  # a user encodes one caption per item
    torch.testing.assert_close(loaded.encode(name, items), model.eval().encode(name, items))
    shown = modality(name).thumbnail(prep[name].decode(references[name][0]))
    assert shown is None or (isinstance(shown, Image.Image) and shown.mode == "RGB")
    assert isinstance(modality(name).describe(cfg), str)
