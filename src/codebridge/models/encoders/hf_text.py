"""Pretrained text towers from ``transformers``: BERT/RoBERTa-like encoders (MiniLM, ...) and CLIP/SigLIP text
towers, selected with ``model.text: {encoder: hf-text, path: ...}``; the tokenizer is the checkpoint's own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from codebridge.config import Config, ConfigError
from codebridge.models.encoders import ENCODERS
from codebridge.models.encoders.layers import masked_mean
from codebridge.models.encoders.pretrained import PretrainedConfig, PretrainedTower, check_layer, load_tower, resolve
from codebridge.models.features import Features

SUMMARISED_BY_POOLER = ("clip", "clip_text_model", "siglip", "siglip_text_model")  # auto pooling: pooler_output


def _classes() -> dict[str, Any]:
    from transformers import CLIPTextModel, SiglipTextModel

    return {
        "clip": CLIPTextModel,
        "clip_text_model": CLIPTextModel,
        "siglip": SiglipTextModel,
        "siglip_text_model": SiglipTextModel,
    }


@dataclass
class HFTextConfig(PretrainedConfig):
    """``model.text`` with ``encoder: hf-text``; ``prep.text.context_length`` is the tokenised length."""

    encoder: str = "hf-text"
    modalities: ClassVar[tuple[str, ...]] = ("text",)


@ENCODERS.register("hf-text", config=HFTextConfig)
class HFTextEncoder(PretrainedTower):
    """The ``text`` batch entry ({"ids", "mask"}, the checkpoint's tokenizer) -> Features: tokens = the chosen
    layer's hidden states with the batch mask; summary = masked mean (BERT-like), pooler output (CLIP/SigLIP),
    the first token (``cls``) or the last real one (``last``)."""

    def __init__(self, cfg: Config, vocab_size: int | None = None) -> None:
        section: HFTextConfig = cfg.model.text
        folder = resolve(section.path, "model.text.path")
        model = load_tower(folder, _classes(), "text_config", "model.text.path")
        super().__init__(section, folder, model, model.config.hidden_size)
        check_layer(section, self.depth, "model.text")
        self.model_type = model.config.model_type
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and cfg.prep.text.context_length > limit:
            raise ConfigError(
                f"prep.text.context_length={cfg.prep.text.context_length} exceeds the tower's "
                f"{limit} positions ({folder}); set it to at most {limit}"
            )
        rows = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > rows:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens but the tower ({folder}) embeds {rows}; "
                "use the checkpoint's own tokenizer (codebridge train loads it from model.text.path)"
            )

    @classmethod
    def adopt(cls, cfg: Config, modality: str, folder: Path) -> None:
        """Nothing to adopt: the tokenizer comes from the checkpoint (``tokenizer``)."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> Features:
        ids, mask = inputs["ids"], inputs["mask"]
        pooling = self.section.pooling
        if pooling == "auto":
            pooling = "pooler" if self.model_type in SUMMARISED_BY_POOLER else "mean"
        out = self.hf(input_ids=ids, attention_mask=mask.long(), output_hidden_states=self.section.layer != -1)
        x = self.hidden(out)
        if pooling == "mean":
            summary = masked_mean(x, mask)
        elif pooling == "cls":
            summary = x[:, 0]
        elif pooling == "last":
            summary = x[torch.arange(x.shape[0], device=x.device), (mask.sum(1) - 1).clamp(min=0)]
        else:
            summary = out.pooler_output
        return Features(tokens=x, mask=mask, summary=summary)
