"""Pretrained speech towers (hf-audio): tiny randomly initialised wav2vec2 and HuBERT checkpoints written here with
``save_pretrained`` (and their feature extractor's ``preprocessor_config.json``) train an image-speech run, save,
load offline and evaluate; the waveform preprocessing equals transformers' feature extractor; the frame mask is
the model's own convolution arithmetic; wrong preprocessing is a named error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from codebridge.config import ConfigError, load_config
from codebridge.data.modalities import modality
from codebridge.data.modalities.audio import AudioPrep, AudioProcessor
from codebridge.eval.run import evaluate_model
from codebridge.models.model import CodeBridgeModel
from codebridge.train import train
from test_pretrained import TINY
from test_trainer import one_thread, tiny_config, write_shapes  # noqa: F401 (one_thread: autouse fixture)

transformers = pytest.importorskip("transformers")

RATE = 16000
CONV = {"conv_dim": (8, 8), "conv_kernel": (10, 3), "conv_stride": (5, 4)}  # 20 samples per frame


def write_speech_tower(folder: Path, family: str = "wav2vec2", stable: bool = False) -> Path:
    """A 2-block wav2vec2 or HuBERT on a 2-layer CNN; ``stable``: layer-norm feature extractor, final layer norm
    after the blocks and an attention mask (wav2vec2-large-lv60's layout), else group norm without (wav2vec2-base)."""
    config_cls, model_cls = {
        "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
        "hubert": (transformers.HubertConfig, transformers.HubertModel),
    }[family]
    norm = {"do_stable_layer_norm": stable, "feat_extract_norm": "layer" if stable else "group"}
    config = config_cls(**TINY, **CONV, **norm, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(
        sampling_rate=RATE, do_normalize=True, return_attention_mask=stable
    ).save_pretrained(folder)
    return folder


def tone(concept: int, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 150 * concept) * t)).astype(np.float32)


@pytest.fixture(scope="module")
def speech_shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shapes with a tone per concept recorded at 8 kHz (so resampled to the tower's 16 kHz), 0.2 .. 0.3 s."""
    folder = tmp_path_factory.mktemp("speech-shapes")
    out = {}
    for name, per_concept, seed in (("train", 2, 0), ("val", 1, 1)):
        path = write_shapes(folder, name, per_concept, seed)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for k, row in enumerate(rows):
            row["audio"] = row["image"].replace(".png", ".wav")
            sf.write(folder / row["audio"], tone(row["labels"]["concept"], 0.2 + 0.05 * (k % 3), 8000), 8000)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        out[name] = path
    return out


def speech_config(data: dict[str, Path], out: Path, tower: Path, *overrides: str):
    return tiny_config(
        data,
        out,
        "data.modalities=[image, audio]",
        f"model.audio={{encoder: hf-audio, path: {tower}}}",
        "prep.audio.max_seconds=0.25",
        "train={steps: 4, batch_size: 8}",
        "train.eval_every=0",
        *overrides,
    )


def encoder_config(tower: Path, *overrides: str):
    """A config whose prep.audio is the tower's (as ``codebridge train`` adopts it)."""
    from codebridge.models.encoders.pretrained import adopt_pretrained

    return adopt_pretrained(
        load_config(
            None,
            ["data.modalities=[audio]", f"model.audio={{encoder: hf-audio, path: {tower}}}", *overrides],
        )
    )


def test_image_speech_trains_saves_loads_offline_and_evaluates(speech_shapes, tmp_path: Path, monkeypatch) -> None:
    tower = write_speech_tower(tmp_path / "w2v")
    run = train(speech_config(speech_shapes, tmp_path / "run", tower))
    cfg = load_config(run / "config.yaml")
    prep = cfg.prep.audio
    assert (prep.features, prep.sample_rate, prep.normalize) == ("waveform", RATE, "utterance")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for f in tower.iterdir():  # the model folder alone suffices
        f.unlink()
    tower.rmdir()
    model = CodeBridgeModel.load(run / "model")
    saved = {p.name for p in (run / "model" / "pretrained" / "audio").iterdir()}
    assert {"config.json", "preprocessor_config.json"} <= saved and not any(n.endswith(".safetensors") for n in saved)
    emb = model.encode(
        "audio", [torch.from_numpy(tone(0, 0.2, RATE)), speech_shapes["val"].parent / "val-red-circle-0.wav"]
    )
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    metrics = evaluate_model(model, str(speech_shapes["val"]), "retrieval", batch_size=8)
    assert 0 <= metrics["audio_to_image_R@1"] <= 1


def test_locked_tower_is_bit_identical_and_unlock_last_trains_the_last_block_and_final_norm(
    speech_shapes, tmp_path: Path
) -> None:
    trained = {}
    for family, lock in (("wav2vec2", "lock: true"), ("hubert", "lock: true, unlock_last: 1")):
        tower = write_speech_tower(tmp_path / family, family, stable=family == "hubert")
        section = f"model.audio={{encoder: hf-audio, path: {tower}, {lock}}}"
        run = train(speech_config(speech_shapes, tmp_path / f"run-{family}", tower, section))
        state = CodeBridgeModel.load(run / "model").state_dict()
        original = transformers.AutoModel.from_pretrained(tower).state_dict()
        trained[family] = {n for n, v in original.items() if not torch.equal(state[f"encoders.audio.hf.{n}"], v)}
    assert trained["wav2vec2"] == set()  # locked: bit-identical
    last_block = {n for n in original if n.startswith("encoder.layers.1.")}
    assert last_block <= trained["hubert"] <= last_block | {"encoder.layer_norm.weight", "encoder.layer_norm.bias"}
    assert "encoder.layer_norm.weight" in trained["hubert"]  # stable layer norm: applied after the blocks


def test_layer_ids_count_the_feature_extractor_as_layer_zero(tmp_path: Path) -> None:
    from codebridge.models.encoders.hf_audio import HFAudioEncoder

    for stable in (False, True):
        tower = write_speech_tower(tmp_path / str(stable), stable=stable)
        encoder = HFAudioEncoder(encoder_config(tower, "model.audio.layer_decay=0.5"))
        scales = encoder.lr_scales()  # 2 blocks: layer k gets 0.5^(3-k)
        assert scales["hf.feature_extractor.conv_layers.0.conv.weight"] == 0.125
        assert scales["hf.feature_projection.projection.weight"] == 0.125
        assert scales["hf.encoder.layers.0.attention.k_proj.weight"] == 0.25
        assert scales["hf.encoder.layers.1.attention.k_proj.weight"] == 0.5
        assert scales["hf.encoder.layer_norm.weight"] == (1.0 if stable else 0.125)


def conv_frames(samples: int) -> int:
    """Output length of CONV's convolutions (no padding): floor((n - kernel) / stride) + 1 per layer."""
    for kernel, stride in zip(CONV["conv_kernel"], CONV["conv_stride"], strict=True):
        samples = (samples - kernel) // stride + 1
    return samples


def batch(processor: AudioProcessor, waves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return modality("audio").collate([processor.entry(w, train=False) for w in waves])


@pytest.mark.parametrize("stable", [False, True], ids=["group-norm-no-mask", "layer-norm-attention-mask"])
def test_frame_mask_is_the_conv_arithmetic_and_a_clip_does_not_depend_on_its_batch(tmp_path: Path, stable) -> None:
    from codebridge.models.encoders.hf_audio import HFAudioEncoder

    cfg = encoder_config(write_speech_tower(tmp_path / "w", stable=stable), "prep.audio.max_seconds=0.3")
    encoder, processor = HFAudioEncoder(cfg).eval(), AudioProcessor(cfg.prep.audio)
    waves = [torch.from_numpy(tone(c, s, RATE)) for c, s in ((0, 0.3), (1, 0.11), (2, 0.0625))]
    with torch.no_grad():
        together = encoder(batch(processor, waves))
        alone = encoder(batch(processor, waves[2:]))
    lengths = [conv_frames(w.numel()) for w in waves]
    assert together.mask.sum(1).tolist() == lengths == [240, 88, 50]
    assert together.tokens.shape[1] == max(lengths) or not stable  # the attention mask lets the batch stay short
    torch.testing.assert_close(together.summary[2], alone.summary[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together.tokens[2, :50], alone.tokens[0, :50], atol=1e-5, rtol=1e-4)


def test_waveform_prep_equals_the_checkpoints_feature_extractor() -> None:
    waves = [0.1 + torch.randn(900, generator=torch.Generator().manual_seed(k)) * (k + 1) for k in range(2)]
    waves.append(torch.arange(1500.0) / 1500)  # longer than max_seconds: cropped to its start at eval
    prep = AudioPrep(features="waveform", normalize="utterance", max_seconds=0.0625)  # 1000 samples
    got = batch(AudioProcessor(prep), waves)
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True, return_attention_mask=True)
    ref = extractor([w[:1000].numpy() for w in waves], sampling_rate=RATE, padding=True, return_tensors="pt")
    assert set(got) == {"waveform", "mask"} and got["waveform"].shape == (3, 1000)
    assert torch.equal(got["mask"], ref["attention_mask"].bool())
    torch.testing.assert_close(got["waveform"], ref["input_values"], atol=1e-5, rtol=1e-5)
    plain = batch(AudioProcessor(AudioPrep(features="waveform", max_seconds=0.0625)), waves)
    assert torch.equal(plain["waveform"][0, :900], waves[0]) and not plain["waveform"][0, 900:].any()


def test_wrong_or_missing_preprocessing_is_a_named_error(speech_shapes, tmp_path: Path) -> None:
    tower = write_speech_tower(tmp_path / "w2v")
    with pytest.raises(ConfigError, match=r"prep.audio.sample_rate=8000 conflicts with the pretrained tower's 16000"):
        train(speech_config(speech_shapes, tmp_path / "a", tower, "prep.audio.sample_rate=8000"))
    with pytest.raises(ConfigError, match=r"prep.audio.normalize=none but the pretrained tower needs utterance"):
        from codebridge.models.encoders.hf_audio import HFAudioEncoder

        cfg = encoder_config(tower)
        cfg.prep.audio.normalize = "none"
        HFAudioEncoder(cfg)
    with pytest.raises(ConfigError, match=r"prep.audio.features='waveform' needs a pretrained speech tower"):
        load_config(None, ["data.modalities=[audio]", "prep.audio.features=waveform"])
    with pytest.raises(ConfigError, match=r"model.audio.pooling='pooler' must be auto, mean or last"):
        load_config(None, [f"model.audio={{encoder: hf-audio, path: {tower}, pooling: pooler}}"])
    (tower / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match=r"model.audio.path: .* lacks preprocessor_config.json"):
        train(speech_config(speech_shapes, tmp_path / "b", tower))
