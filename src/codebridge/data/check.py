"""``codebridge data check``: read a dataset, decode every media file, and list every problem at once.

Reading collects bad rows instead of stopping (``data.skip_bad`` semantics); decoding is training's own
``dataset.decode``, so a sample that passes here also loads in ``SampleDataset``. A spec without any sample fails.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from codebridge.config import Config
from codebridge.data.dataset import decode
from codebridge.data.modalities import check_modalities, modality_names
from codebridge.data.preprocess import Preprocessors
from codebridge.data.sample import BadSampleError
from codebridge.data.sources import Problem, Problems, read_source
from codebridge.data.sources.spec import RowError

EMPTY = "no samples: the data holds no rows (or shard members) to train on; add some"


@dataclass
class CheckReport:
    """Every problem of one dataset. ``total`` counts samples read plus rows rejected while reading."""

    spec: str
    total: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems and self.total > 0

    @property
    def bad(self) -> int:
        return len({p.source for p in self.problems})

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "ok": self.ok,
            **({} if self.total else {"error": EMPTY}),
            "total": self.total,
            "good": self.total - self.bad,
            "bad": self.bad,
            "bad_by_reason": self.by_reason(),
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }

    def render(self) -> str:
        lines = [f"{self.spec}: {self.total} sample(s), {self.total - self.bad} ok, {self.bad} bad"]
        if not self.total:
            return f"{self.spec}: {EMPTY}"
        if self.ok:
            return lines[0]
        lines.append("bad by reason: " + ", ".join(f"{kind} {n}" for kind, n in self.by_reason().items()))
        rows = [("source", "modality", "reason"), *((p.source, p.modality or "-", p.reason) for p in self.problems)]
        width = [max(len(row[i]) for row in rows) for i in range(2)]
        lines += ["", *(f"{s:<{width[0]}}  {m:<{width[1]}}  {r}" for s, m, r in rows)]
        return "\n".join(lines)


def check_dataset(spec: str, cfg: Config, modalities: list[str] | None = None) -> CheckReport:
    """Read ``spec`` collecting every bad row, decode all media, and require ``modalities`` of every sample."""
    required = list(modalities or [])
    if required:
        check_modalities(required, "--modalities")
    problems = Problems(skip=True)
    samples = read_source(spec, cfg.data, problems)
    rejected = len({p.source for p in problems.found})
    prep = Preprocessors(cfg.prep)
    for sample in tqdm(samples, desc=f"checking {spec}", unit="sample", disable=None):
        for modality in required:
            if not sample.has(modality):
                problems.add(sample.source, RowError(f"missing {modality}", f"no {modality} (required)", modality))
        for modality in modality_names():
            if not sample.has(modality):
                continue
            try:
                decode(prep, sample, modality)
            except BadSampleError as err:
                problems.add(sample.source, RowError(f"corrupt {modality}", err.reason, modality))
    return CheckReport(spec, len(samples) + rejected, problems.found)
