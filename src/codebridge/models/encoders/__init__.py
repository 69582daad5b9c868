"""Modality encoders: each maps a batch of preprocessed inputs to ``Features``.

``ENCODERS.get(modality)(cfg)`` builds one; it has ``width`` (the feature size D) and
``forward(inputs) -> Features`` where ``inputs`` is the modality's entry of the batch (docs/architecture.md).
The text encoder also takes ``vocab_size=`` (the tokenizer's real size; default ``prep.text.vocab_size``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from codebridge.registry import Registry

ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")

# Importing the modules registers them; they import ENCODERS from here, so this comes after its definition.
from codebridge.models.encoders import audio, hf_audio, hf_text, hf_video, hf_vision, image, text, video  # noqa: E402

__all__ = ["ENCODERS", "audio", "hf_audio", "hf_text", "hf_video", "hf_vision", "image", "text", "video"]
