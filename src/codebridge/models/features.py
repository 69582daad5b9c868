"""What encoders hand to bridges, and what bridges hand back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Features:
    """Encoder output for one modality.

    tokens:  [B, T, D] fine-grained vectors (patches, words, audio frames, video frames)
    mask:    [B, T] bool, True where a token is real (False = padding)
    summary: [B, D] one vector per input (CLS / pooled)
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    summary: torch.Tensor


@dataclass
class BridgeOutput:
    """Bridge output for one modality.

    embedding: [B, E] L2-normalised retrieval vector; the retrieval score of two items is the dot product
               of their embeddings (a bridge that fuses several similarities concatenates scaled parts).
    extras:    named tensors for the loss and for analysis (code indices, soft code distributions,
               FDT weights, ...), documented by each bridge.
    """

    embedding: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
