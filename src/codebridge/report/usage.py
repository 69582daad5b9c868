"""Code usage of a trained discrete bridge on the validation data, measured from the model's own outputs.

The training log only has summaries (used fraction, perplexity) of recent batches; this counts, per modality,
how much each code carries over a whole data set, so the report can show which codes are shared and which
are idle. ``codebook``: token positions assigned to each code. ``fdt``: sparsemax weight mass on each token.
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
from codebridge.models.features import BridgeOutput

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

UNITS = {"codes": "token positions", "weights": "token weight mass"}  # extras key -> what is counted
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


def counts_of(output: BridgeOutput, key: str, size: int) -> np.ndarray:
    """Usage in one batch: code assignments of the valid positions (``codes``), or summed token ``weights``."""
    if key == "codes":
        codes = output.extras["codes"]
        return torch.bincount(codes[codes >= 0].flatten().cpu(), minlength=size).double().numpy()
    return output.extras["weights"].double().sum(0).cpu().numpy()


def bridge_size(model: CodeBridgeModel) -> tuple[str, int] | None:
    """(extras key, number of codes) of a discrete bridge; None for a bridge without a shared discrete space."""
    bridge = model.cfg.model.bridge
    if bridge.name == "codebook":
        return "codes", bridge.codebook.size
    if bridge.name == "fdt":
        return "weights", bridge.fdt.num_tokens
    return None


@torch.no_grad()
def model_code_usage(model: CodeBridgeModel, samples: list[Sample], batch_size: int = 256) -> CodeUsage | None:
    """Usage per modality over ``samples`` (every model modality they all have); None for the clip bridge."""
    kind = bridge_size(model)
    if kind is None or not samples:
        return None
    key, size = kind
    counts = {}
    for modality in [m for m in model.modalities if all(s.has(m) for s in samples)]:
        dataset = SampleDataset(samples, [modality], model.preprocessors, train=False, cache=False)
        total = np.zeros(size)
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            entry = {k: v.to(model.device) for k, v in batch[modality].items()}
            output = model.bridge({modality: model.encoders[modality](entry)})[modality]
            total += counts_of(output, key, size)
        counts[modality] = total
    return CodeUsage(UNITS[key], size, counts) if counts else None
