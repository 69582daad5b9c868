"""Training: the step loop (``trainer``), AdamW + warmup/cosine (``optim``), atomic checkpoints (``checkpoint``)."""

from codebridge.train.trainer import TrainingDiverged, train

__all__ = ["TrainingDiverged", "train"]
