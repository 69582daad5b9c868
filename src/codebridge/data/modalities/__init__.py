"""Modalities: each one file registering one ``Modality`` spec in ``MODALITIES`` (base.py says what a spec answers).

Importing this package registers the built-in ones, in this order (the order of config sections and reports).
"""

from __future__ import annotations

from codebridge.data.modalities.base import (
    MODALITIES,
    Modality,
    Processor,
    check_modalities,
    encoder_configs,
    encoder_name,
    encoder_options,
    modality,
    modality_names,
    prep_configs,
    register_modality,
)

# isort: off
from codebridge.data.modalities import image  # the registration order: image, text, audio, video
from codebridge.data.modalities import text
from codebridge.data.modalities import audio
from codebridge.data.modalities import video

# isort: on

__all__ = [
    "MODALITIES",
    "Modality",
    "Processor",
    "audio",
    "check_modalities",
    "encoder_configs",
    "encoder_name",
    "encoder_options",
    "image",
    "modality",
    "modality_names",
    "prep_configs",
    "register_modality",
    "text",
    "video",
]
