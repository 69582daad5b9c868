"""Code usage of a trained bridge's discrete space on the validation data, measured by the bridge itself.

The training log only has summaries (used fraction, perplexity) of recent batches; this counts, per modality,
how much each code carries over a whole data set, so the report can show which codes are shared and which
are idle. What is counted is the space's ``mass`` (``codebook``: token positions assigned to each code; ``fdt``:
sparsemax weight mass on each token).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from codebridge.data.dataset import SampleDataset, collate
from codebridge.data.sample import Sample

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

TOP = 10


@dataclass
class CodeUsage:
    unit: str  # what is counted per code
    size: int  # number of codes / tokens
    counts: dict[str, np.ndarray]  # modality -> [size] usage

    def stats(self) -> list[dict[str, object]]:
        """Per modality: codes used, perplexity of the usage distribution, and the most used codes."""
        rows = []
        for modality, counts in self.counts.items():
            share = counts / max(counts.sum(), 1e-12)
            nonzero = share[share > 0]
            order = np.argsort(-share, kind="stable")[:TOP]
            rows.append(
                {
                    "modality": modality,
                    "used": int((counts > 0).sum()),
                    "perplexity": math.exp(-float((nonzero * np.log(nonzero)).sum())),
                    "top": [(int(c), float(share[c])) for c in order if share[c] > 0],
                }
            )
        return rows

    def overlaps(self) -> list[tuple[str, float]]:
        """Per modality pair, the Jaccard overlap of the sets of used codes (1: both use exactly the same codes)."""
        result = []
        for a, b in itertools.combinations(self.counts, 2):
            used_a, used_b = self.counts[a] > 0, self.counts[b] > 0
            union = (used_a | used_b).sum()
            result.append((f"{a}-{b}", float((used_a & used_b).sum() / union) if union else 0.0))
        return result


@torch.no_grad()
def model_code_usage(model: CodeBridgeModel, samples: list[Sample], batch_size: int = 256) -> CodeUsage | None:
    """Usage per modality over ``samples`` (every model modality they all have); None for a bridge without a
    discrete space."""
    space = model.bridge.discrete_space()
    if space is None or not samples:
        return None
    counts = {}
    for modality in [m for m in model.modalities if all(s.has(m) for s in samples)]:
        dataset = SampleDataset(samples, [modality], model.preprocessors, train=False)
        total = np.zeros(space.size)
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            total += space.mass(modality, model.features(modality, batch[modality])).double().sum(0).cpu().numpy()
        counts[modality] = total
    return CodeUsage(space.mass_unit, space.size, counts) if counts else None
