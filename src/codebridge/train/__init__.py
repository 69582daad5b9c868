"""Training: the step loop (``trainer``), AdamW + warmup/cosine (``optim``), atomic checkpoints (``checkpoint``)."""

from codebridge.train.trainer import LostContact, TrainingDiverged, train

__all__ = ["LostContact", "TrainingDiverged", "train"]
