import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import codebridge
from codebridge.config import Config, ConfigError
from codebridge.data.dataset import SampleDataset, collate
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.data.sample import Sample
from codebridge.models.bridges import import_bridges
from codebridge.models.bridges.base import BRIDGES
from codebridge.models.model import CodeBridgeModel
from helpers import small_config

torch.set_num_threads(1)
MODALITIES = ["image", "text", "audio", "video"]
CAPTIONS = ["a red square", "a blue circle", "green triangle on white", "the yellow star", "purple heart"]


def make_model(modalities: list[str] = MODALITIES, cfg: Config | None = None) -> CodeBridgeModel:
    cfg = cfg or small_config()
    torch.manual_seed(0)
    prep = Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text))
    return CodeBridgeModel(cfg, modalities, prep)


def write_video(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, list]:
    """Real files: RGBA PNGs, WAVs of different lengths (so audio batches are padded), MP4 clips."""
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    items: dict[str, list] = {"image": [], "text": CAPTIONS, "audio": [], "video": []}
    for i in range(len(CAPTIONS)):
        Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA").save(root / f"{i}.png")
        sf.write(root / f"{i}.wav", rng.standard_normal(2000 + 1500 * i).astype(np.float32) * 0.1, 8000)
        write_video(root / f"{i}.mp4", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
        items["image"].append(str(root / f"{i}.png"))
        items["audio"].append(str(root / f"{i}.wav"))
        items["video"].append(str(root / f"{i}.mp4"))
    return items


@pytest.fixture(scope="module")
def model() -> CodeBridgeModel:
    return make_model()


def collated(model: CodeBridgeModel, raw: dict[str, list]) -> dict:
    """The batch the training data path makes of the same files (eval transforms)."""
    samples = [
        Sample(key=str(i), source=f"test:{i}", media={m: [raw[m][i]] if m == "text" else raw[m][i] for m in raw})
        for i in range(len(CAPTIONS))
    ]
    dataset = SampleDataset(samples, MODALITIES, model.preprocessors, train=False)
    return collate([dataset[i] for i in range(len(dataset))])


def test_import_bridges_registers_clip():
    import_bridges()
    assert "clip" in BRIDGES.names()


def test_forward_and_loss_over_every_pair(model, raw):
    batch = collated(model, raw)
    outputs = model(batch)
    assert set(outputs) == set(MODALITIES)
    assert all(out.embedding.shape == (5, 8) for out in outputs.values())
    loss, logs = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert len([k for k in logs if k.startswith("loss/contrastive/")]) == 6
    loss.backward()
    assert all(p.grad is not None for p in model.encoders.parameters())
    model.zero_grad()


def test_forward_needs_a_model_modality(model):
    with pytest.raises(KeyError, match="none of the model's modalities"):
        model({"index": torch.arange(2)})


@pytest.mark.parametrize("modality", MODALITIES)
def test_encode_raw_equals_encode_collated(model, raw, modality):
    batch = collated(model, raw)
    from_raw = model.encode(modality, raw[modality])
    from_batch = model.encode(modality, batch[modality])
    assert from_raw.shape == (5, 8)
    assert torch.allclose(from_raw, from_batch, atol=1e-6)
    # in chunks of 2 the audio is padded to other lengths: the embeddings must not notice
    assert torch.allclose(model.encode(modality, raw[modality], batch_size=2), from_raw, atol=1e-5)


def test_encode_accepts_in_memory_items(model, raw):
    pil = [Image.open(p) for p in raw["image"]]  # RGBA: composited on the background like the files
    assert torch.allclose(model.encode("image", pil), model.encode("image", raw["image"]), atol=1e-6)
    waves = [model.preprocessors["audio"].load(p).numpy() for p in raw["audio"]]
    assert torch.allclose(model.encode("audio", waves), model.encode("audio", raw["audio"]), atol=1e-6)
    frames = [model.preprocessors["video"].load(p) for p in raw["video"]]
    assert torch.allclose(model.encode("video", frames), model.encode("video", raw["video"]), atol=1e-6)
    one = model.encode("text", CAPTIONS[2])
    assert torch.allclose(one, model.encode("text", CAPTIONS)[2:3], atol=1e-6)


def test_encode_runs_in_eval_mode_and_restores_the_mode(model):
    model.train()
    model.encode("text", CAPTIONS)
    assert model.training
    model.eval()


def test_encode_errors_are_clear(model):
    with pytest.raises(KeyError, match="no speech encoder"):
        model.encode("speech", ["x"])
    with pytest.raises(TypeError, match="text item 1: text inputs must be strings, got int"):
        model.encode("text", ["ok", 3])
    with pytest.raises(ValueError, match="got no inputs"):
        model.encode("text", [])


def test_similarity_is_the_dot_product(model):
    text = model.encode("text", CAPTIONS)
    scores = model.similarity(text, text[:2])
    assert scores.shape == (5, 2)
    assert torch.allclose(scores, text @ text[:2].T)
    assert torch.allclose(scores.diagonal(), torch.ones(2), atol=1e-5)


def test_save_load_gives_identical_embeddings_without_pickles(model, raw, tmp_path):
    model.save(tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files == [
        "config.json",
        "model.safetensors",
        "preprocessing.json",
        "tokenizer.json",
        "tokenizer_settings.json",
    ]
    for name in files:  # a pickle starts with the PROTO opcode; torch.save writes a zip with a data.pkl
        head = (tmp_path / "model" / name).read_bytes()
        assert not head.startswith(b"\x80") and b"data.pkl" not in head
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["modalities"] == MODALITIES and meta["codebridge_version"] == codebridge.__version__
    loaded = codebridge.load(tmp_path / "model")
    assert not loaded.training and loaded.modalities == MODALITIES
    for modality in MODALITIES:
        assert torch.equal(loaded.encode(modality, raw[modality]), model.encode(modality, raw[modality]))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_names_a_missing_file(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*nowhere does not exist; pass RUN/model"):
        CodeBridgeModel.load(tmp_path / "nowhere")
    model.save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors; pass RUN/model"):
        CodeBridgeModel.load(tmp_path)


def test_load_rejects_an_incompatible_config(model, tmp_path):
    model.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["model"]["image"]["no_such_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config.json: config.model.image: unknown key\(s\) no_such_field"):
        CodeBridgeModel.load(tmp_path)
    del meta["config"]["model"]["image"]["no_such_field"]
    meta["modalities"] = ["image", "smell"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        ConfigError,
        match=r"config.json: data.modalities: 'smell' is not a registered modality; expected one of image, text, audio",
    ):
        CodeBridgeModel.load(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("heads", 3, r"config\.model\.image\.heads=3 must divide config\.model\.image\.width=16"),
        ("depth", -1, r"config\.model\.image\.depth: -1 is out of range; expected an integer >= 1"),
    ],
)
def test_load_names_a_wrong_value_in_config_json(model, tmp_path, field, value, needle):
    model.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["model"]["image"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"config\.json: {needle}.*; the file was edited or comes from another"):
        CodeBridgeModel.load(tmp_path)


def test_load_blames_an_edited_config_json_that_no_longer_fits_the_weights(model, tmp_path):
    model.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["model"]["image"]["depth"] += 1  # a valid value, but not the one the weights were trained with
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"does not fit .*config\.json \(missing .*config\.json was edited"):
        CodeBridgeModel.load(tmp_path)


def test_load_rejects_weights_of_another_model(tmp_path):
    make_model(["image", "text"]).save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["model"]["bridge"]["embed_dim"] = 4
    (tmp_path / "config.json").write_text(json.dumps(meta))
    shapes = r"\(bridge.proj.image.weight: \(8, 16\) in the file, \(4, 16\) in the model"
    with pytest.raises(ConfigError, match=r"model.safetensors does not fit .*config.json " + shapes):
        CodeBridgeModel.load(tmp_path)
    meta["modalities"] = ["image", "text", "audio"]
    meta["config"]["model"]["bridge"]["embed_dim"] = 8
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"missing \['bridge.proj.audio.weight'"):
        CodeBridgeModel.load(tmp_path)


def test_model_rejects_bad_modalities_and_mismatched_prep():
    cfg = small_config()
    prep = Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text))
    with pytest.raises(ConfigError, match=r"data\.modalities"):
        CodeBridgeModel(cfg, ["image", "smell"], prep)
    other = small_config()
    other.prep.image.size = 32
    with pytest.raises(ConfigError, match="prep section"):
        CodeBridgeModel(other, ["image", "text"], prep)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep))
