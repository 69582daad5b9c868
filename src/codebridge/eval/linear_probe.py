"""Linear probe: multinomial logistic regression on frozen embeddings, fitted on one split, scored on another.

Features are standardised with the training split's mean and spread before an L2-regularised fit (sklearn,
L-BFGS), so one inverse strength ``c`` suits any embedding width and scale.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

MAX_ITER = 1000


def _labelled(features: Tensor, labels: Tensor, split: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows that carry the label (-1 means the sample has none), as float64/int64 arrays."""
    keep = (labels >= 0).cpu().numpy()
    if not keep.any():
        raise ValueError(f"linear probe: no {split} sample has the label {label!r}")
    return features.detach().cpu().double().numpy()[keep], labels.cpu().numpy()[keep]


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, label: str = "label", c: float = 1.0
) -> float:
    """Top-1 accuracy on the test rows of a logistic regression fitted on the train rows.

    Test classes never seen in training can only be wrong; they are kept, so the score is honest about them.
    """
    x_fit, y_fit = _labelled(train_x, train_y, "train", label)
    x_test, y_test = _labelled(test_x, test_y, "test", label)
    if len(np.unique(y_fit)) < 2:
        raise ValueError(f"linear probe: the train samples have a single {label!r} class; a probe needs two")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))
    probe.fit(x_fit, y_fit)
    return float(np.mean(probe.predict(x_test) == y_test))
