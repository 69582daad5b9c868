"""``codebridge data check``: read a dataset, decode every media file, and list every problem at once.

Reading collects bad rows instead of stopping (``data.skip_bad`` semantics); decoding uses the same loaders as
training, so a sample that passes here also loads in ``SampleDataset``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from codebridge.config import Config, ConfigError, PrepConfig
from codebridge.data.preprocess import AudioProcessor, ImageProcessor, VideoProcessor
from codebridge.data.sample import MODALITIES
from codebridge.data.sources import Problem, Problems, read_source
from codebridge.data.sources.spec import RowError

Loader = Callable[[str | bytes], Any]


def make_loaders(prep: PrepConfig) -> dict[str, Loader]:
    """The decoders training uses: each raises ValueError/OSError with a reason on a corrupt file."""
    return {
        "image": ImageProcessor(prep.image).load,
        "audio": AudioProcessor(prep.audio).load,
        "video": VideoProcessor(prep.video, prep.image).load,
    }


@dataclass
class CheckReport:
    """Every problem of one dataset. ``total`` counts samples read plus rows rejected while reading."""

    spec: str
    total: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad(self) -> int:
        return len({p.source for p in self.problems})

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "ok": self.ok,
            "total": self.total,
            "good": self.total - self.bad,
            "bad": self.bad,
            "bad_by_reason": self.by_reason(),
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }

    def render(self) -> str:
        lines = [f"{self.spec}: {self.total} sample(s), {self.total - self.bad} ok, {self.bad} bad"]
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
    if unknown := sorted(set(required) - set(MODALITIES)):
        raise ConfigError(f"--modalities: unknown {', '.join(unknown)}; choose from {', '.join(MODALITIES)}")
    problems = Problems(skip=True)
    samples = read_source(spec, cfg.data, problems)
    rejected = len({p.source for p in problems.found})
    loaders = make_loaders(cfg.prep)
    for sample in tqdm(samples, desc=f"checking {spec}", unit="sample", disable=None):
        for modality in required:
            if not sample.has(modality):
                problems.add(sample.source, RowError(f"missing {modality}", f"no {modality} (required)", modality))
        for modality, load in loaders.items():
            value = getattr(sample, modality)
            if value is None:
                continue
            try:
                load(value)
            except (ValueError, OSError) as exc:
                problems.add(sample.source, RowError(f"corrupt {modality}", str(exc), modality))
    return CheckReport(spec, len(samples) + rejected, problems.found)
