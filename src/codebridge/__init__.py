"""codebridge: cross-modal representation learning through a shared discrete space."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(model_dir, map_location="cpu"):
    """Load a trained model folder (weights, config, tokenizer, preprocessing); never unpickles code."""
    from codebridge.models.model import CodeBridgeModel

    return CodeBridgeModel.load(model_dir, map_location=map_location)
