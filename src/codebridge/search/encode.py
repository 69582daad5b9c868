"""One encoder pass per batch gives both halves of an index entry: the dense embedding and, when the bridge has a
discrete space, the item's sparse code/token weights (``DiscreteSpace.mass``, L2-normalised)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from codebridge.models.model import CodeBridgeModel, prepare_batch


def has_codes(model: CodeBridgeModel) -> bool:
    return model.bridge.discrete_space() is not None


@torch.inference_mode()
def encode_entry(
    model: CodeBridgeModel, modality: str, entry: dict[str, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings [B, E], code weights [B, K] or None) of one collated batch entry, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        features = model.features(modality, entry)
        embedding = model.bridge({modality: features})[modality].embedding.float().cpu().numpy()
        space = model.bridge.discrete_space()
        if space is None:
            return embedding, None
        mass = space.mass(modality, features).float()
        return embedding, torch.nn.functional.normalize(mass, dim=-1).cpu().numpy()
    finally:
        model.train(was_training)


def encode_items(model: CodeBridgeModel, modality: str, items: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """``encode_entry`` of raw items (captions, file paths or bytes) with the model's eval preprocessing."""
    return encode_entry(model, modality, prepare_batch(model.preprocessors, modality, items))
