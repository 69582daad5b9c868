"""(b) The FDT layer, lean against naive: time and peak memory of one forward + backward, and equal results.

The layer is ``FdtBridge.forward`` from the queries to the embedding (grounding, pooling over the T vectors,
sparsemax over the C tokens, mixture of tokens, L2 norm) with the query MLP replaced by the identity: it is the
same in both variants, so it would only dilute the comparison. Naive: ``chunk_size`` 0 (the full [B, T, C] scores)
and the full-sort sparsemax. Lean: the chunked max-pool and the adaptive top-k sparsemax.

The sparsemax support decides how much work top-k and the sparse backward save, so the layer is measured in two
regimes: ``init`` at the configured temperature (1000, the authors'), where N(0, 1) queries and tokens give a wide
support, and ``sparse`` at temperature 1, a support of a few tokens as when a low temperature sharpens it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from codebridge.config import BridgeConfig
from codebridge.models.bridges.fdt import FdtBridge, FdtConfig
from codebridge.models.features import Features
from perf_measure import interleaved_times, median, peak_bytes

MODALITY = "x"
REGIMES = {"init": FdtConfig().temperature, "sparse": 1.0}


@dataclass(frozen=True)
class LayerShape:
    batch: int = 256
    length: int = 64
    tokens: int = 16384
    dim: int = 512
    chunk: int = 8  # positions per chunk of the lean grounding


def build_layer(shape: LayerShape, temperature: float, lean: bool) -> FdtBridge:
    fdt = FdtConfig(
        num_tokens=shape.tokens,
        dim=shape.dim,
        temperature=temperature,
        chunk_size=shape.chunk if lean else 0,
        topk_sparsemax=lean,
    )
    bridge = FdtBridge(BridgeConfig(name="fdt", sections={"fdt": fdt}), {MODALITY: shape.dim})
    bridge.query[MODALITY] = nn.Identity()
    return bridge


class LayerRun:
    """One variant's forward + backward on fixed inputs; ``results()`` are its embedding and gradients."""

    def __init__(self, bridge: FdtBridge, q: torch.Tensor, mask: torch.Tensor, upstream: torch.Tensor) -> None:
        self.bridge, self.q, self.mask, self.upstream = bridge, q, mask, upstream
        self.embedding: torch.Tensor | None = None

    def clear(self) -> None:
        self.q.grad = None
        self.bridge.zero_grad(set_to_none=True)
        self.embedding = None

    def __call__(self) -> None:
        self.clear()
        features = Features(tokens=self.q, mask=self.mask, summary=self.q[:, 0])
        embedding = self.bridge({MODALITY: features}, step=0)[MODALITY].embedding
        (embedding * self.upstream).sum().backward()
        self.embedding = embedding.detach()

    def results(self) -> dict[str, torch.Tensor]:
        return {"embedding": self.embedding, "grad_q": self.q.grad, "grad_tokens": self.bridge.tokens.grad}


def _inputs(shape: LayerShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape.batch, shape.length, shape.dim, generator=g)
    lengths = torch.randint(shape.length // 2, shape.length + 1, (shape.batch,), generator=g)  # some padding
    mask = torch.arange(shape.length) < lengths[:, None]
    upstream = torch.randn(shape.batch, shape.dim, generator=g)
    return q.to(device).requires_grad_(), mask.to(device), upstream.to(device)


def compare(lean: dict[str, torch.Tensor], naive: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per result: max |lean - naive| relative to max |naive|, and allclose at rtol 1e-4 on that scale."""
    out: dict[str, Any] = {}
    for name, ref in naive.items():
        scale = ref.abs().max().item()
        diff = (lean[name] - ref).abs().max().item()
        out[name] = {"max_abs_diff": diff, "max_abs": scale, "allclose": diff <= 1e-4 * scale}
    out["all_equal"] = all(v["allclose"] for v in out.values())
    return out


def run_regime(shape: LayerShape, temperature: float, device: torch.device, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    naive_bridge = build_layer(shape, temperature, lean=False).to(device)
    lean_bridge = build_layer(shape, temperature, lean=True).to(device)
    lean_bridge.load_state_dict(naive_bridge.state_dict())
    q, mask, upstream = _inputs(shape, device)
    runs = {"naive": LayerRun(naive_bridge, q, mask, upstream), "lean": LayerRun(lean_bridge, q, mask, upstream)}
    # the warm-up round also sets the adaptive top-k's k from the observed support, as in training
    times = interleaved_times(runs, device, repeats, warmup=1)
    results = {}
    for name, run in runs.items():
        run()
        results[name] = {k: v.clone() for k, v in run.results().items()}
    with torch.no_grad():
        weights = lean_bridge({MODALITY: Features(q, mask, q[:, 0])})[MODALITY].extras["weights"]
    support = (weights > 0).sum(-1).float()
    peaks = {}
    for name, run in runs.items():
        run.clear()
        peaks[name] = peak_bytes(run, device)
        run.clear()
    speedup = median(times["naive"]) / median(times["lean"])
    return {
        "temperature": temperature,
        "support_mean": support.mean().item(),
        "support_max": support.max().item(),
        "seconds": times,
        "seconds_median": {name: median(t) for name, t in times.items()},
        "peak_mb": {name: b / 2**20 for name, b in peaks.items()},
        "speedup": speedup,
        "memory_ratio": peaks["lean"] / peaks["naive"],
        "equal": compare(results["lean"], results["naive"]),
    }


def run_fdt_layer(shape: LayerShape, device: torch.device, repeats: int) -> dict[str, Any]:
    """Both regimes; the headline figures are those of ``init``, the wider support (less for the lean path to skip)."""
    regimes = {name: run_regime(shape, t, device, repeats) for name, t in REGIMES.items()}
    return {"shape": dataclasses.asdict(shape), "regimes": regimes}
