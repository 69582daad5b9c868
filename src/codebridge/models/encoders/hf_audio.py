"""Pretrained speech towers from ``transformers``: wav2vec2, HuBERT and any AutoModel with their convolutional front
end and outputs (WavLM, data2vec-audio, ...), selected with ``model.audio: {encoder: hf-audio, path: ...}``;
``prep.audio`` then gives the waveform at the checkpoint's sample rate and normalisation (its feature extractor's
``preprocessor_config.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from codebridge.config import Config, ConfigError, broken
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.layers import masked_mean
from codebridge.models.encoders.pretrained import (
    PREPROCESSOR_FILE,
    PretrainedConfig,
    PretrainedTower,
    adopt_prep,
    check_layer,
    load_tower,
    require_prep,
    resolve,
)
from codebridge.models.features import Features

EXTRACTOR_DEFAULTS = {"sampling_rate": 16000, "do_normalize": True, "return_attention_mask": False}  # transformers'


def feature_extractor(folder: Path) -> dict[str, Any]:
    """The checkpoint's feature extractor settings (transformers' defaults for keys it leaves out); a ConfigError
    when the file is missing, since the sample rate and normalisation must never be guessed."""
    file = folder / PREPROCESSOR_FILE
    if not file.is_file():
        raise ConfigError(
            f"model.audio.path: {folder} lacks {PREPROCESSOR_FILE} (the feature extractor's sample rate and "
            "normalisation); copy it from the checkpoint, or write it with transformers' "
            "Wav2Vec2FeatureExtractor(sampling_rate=..., do_normalize=...).save_pretrained(folder)"
        )
    return EXTRACTOR_DEFAULTS | json.loads(file.read_text())


def checkpoint_prep(folder: Path) -> tuple[dict[str, Any], str]:
    """``prep.audio`` as the checkpoint was trained: the waveform at its sample rate, normalised per utterance
    when its feature extractor says ``do_normalize``; and where that comes from."""
    values = feature_extractor(folder)
    wanted = {
        "features": "waveform",
        "sample_rate": int(values["sampling_rate"]),
        "normalize": "utterance" if values["do_normalize"] else "none",
    }
    return wanted, str(folder / PREPROCESSOR_FILE)


@dataclass
class HFAudioConfig(PretrainedConfig):
    """``model.audio`` with ``encoder: hf-audio``."""

    encoder: str = "hf-audio"
    modalities: ClassVar[tuple[str, ...]] = ("audio",)

    def check(self) -> list[str]:
        speech = "{pooling} must be auto, mean or last: speech towers have no class token or pooler"
        return super().check() + broken({speech: self.pooling in ("auto", "mean", "last")})


@ENCODERS.register("hf-audio", config=HFAudioConfig)
class HFAudioEncoder(PretrainedTower):
    """The ``audio`` batch entry ({"waveform": [B,N], "mask": [B,N]}) -> Features: tokens = the frames of the chosen
    layer, masked by the model's own convolution arithmetic on each clip's length (``_get_feat_extract_output_
    lengths``); summary = their masked mean (auto) or the last real frame (``last``). The convolutional feature
    extractor counts as layer 0 for ``unlock_last`` and ``layer_decay``.

    The attention mask is passed only when the feature extractor returns one (``return_attention_mask``), as
    transformers documents: checkpoints without it (group-norm feature extractors such as wav2vec2-base) must see
    zero padding and no mask; they get every clip padded to ``prep.audio.max_seconds``, so a clip's embedding does
    not depend on the other clips of its batch."""

    def __init__(self, cfg: Config) -> None:
        section: HFAudioConfig = cfg.model.audio
        folder = resolve(section.path, "model.audio.path")
        require_prep(cfg, "audio", *checkpoint_prep(folder))
        model = load_tower(folder, {}, "audio_config", "model.audio.path")
        if not hasattr(model, "_get_feat_extract_output_lengths"):
            raise ConfigError(
                f"model.audio.path: {folder} holds a {type(model).__name__}, not a speech encoder with a "
                "convolutional front end (wav2vec2, HuBERT, WavLM, ...)"
            )
        super().__init__(section, folder, model, model.config.hidden_size)
        check_layer(section, self.depth, "model.audio")
        self.attend = bool(feature_extractor(folder)["return_attention_mask"])
        self.samples = int(cfg.prep.audio.max_seconds * cfg.prep.audio.sample_rate)
        # an adapter (add_adapter) shortens only the final output, not the blocks' hidden states
        self._lengths = (
            {"add_adapter": False} if getattr(model.config, "add_adapter", False) and section.layer != -1 else {}
        )

    @classmethod
    def adopt(cls, cfg: Config, modality: str, folder: Path) -> None:
        adopt_prep(cfg, modality, *checkpoint_prep(folder))

    def follows_blocks(self, name: str) -> bool:
        """A stable-layer-norm encoder (``do_stable_layer_norm``) applies ``encoder.layer_norm`` after its blocks."""
        return bool(getattr(self.hf.config, "do_stable_layer_norm", False)) and name.startswith("encoder.layer_norm.")

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        """Frames of the chosen layer for clips of ``samples`` samples (at least one)."""
        return self.hf._get_feat_extract_output_lengths(samples, **self._lengths).long().clamp(min=1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        wave, mask = inputs["waveform"], inputs["mask"]
        if self.attend:
            out = self.hf(wave, attention_mask=mask.long(), output_hidden_states=self.section.layer != -1)
        else:
            wave = F.pad(wave, (0, max(self.samples - wave.shape[1], 0)))
            out = self.hf(wave, output_hidden_states=self.section.layer != -1)
        x = self.hidden(out)
        lengths = self.frames(mask.sum(1))
        frame_mask = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
        if self.section.pooling == "last":
            summary = x[torch.arange(x.shape[0], device=x.device), lengths.clamp(max=x.shape[1]) - 1]
        else:
            summary = masked_mean(x, frame_mask)
        return Features(tokens=x, mask=frame_mask, summary=summary)
