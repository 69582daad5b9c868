"""The discrete bridges' training steps have no host sync: each traces into one ``torch.compile`` graph.

A host read (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, boolean-mask indexing) or a data-dependent shape
in the step is a graph break, which ``fullgraph=True`` turns into an error; a Python number that changes every step
(a counter) is a recompile per step, counted here. The compiled step (which runs the accelerator's fixed-shape paths:
full-sort sparsemax, dense max-pool backward, masked statistics) must give the eager (CPU) path's loss, gradients and
buffers. ``aot_eager`` also traces the backward, so the custom autograd Functions' backward is checked too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from codebridge.config import BridgeConfig
from codebridge.models.bridges.base import BRIDGES, Bridge
from codebridge.models.bridges.codebook import CodebookConfig
from codebridge.models.bridges.fdt import FdtConfig
from codebridge.models.bridges.fdt_grounding import pooled_scores
from codebridge.models.bridges.vector_quantizer import EMAVectorQuantizer
from codebridge.models.features import Features

WIDTHS = {"image": 6, "text": 5}
LENGTHS = {"image": 4, "text": 6}
STEPS = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _features(seed: int, batch: int = 4) -> dict[str, Features]:
    """Random float64 features; text has ragged masks (position 0 always real), images none."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, width in WIDTHS.items():
        tokens = torch.randn(batch, LENGTHS[m], width, generator=g, dtype=torch.float64)
        mask = torch.rand(batch, LENGTHS[m], generator=g) > (0.4 if m == "text" else -1.0)
        mask[:, 0] = True
        out[m] = Features(tokens, mask, torch.randn(batch, width, generator=g, dtype=torch.float64))
    return out


def _bridge(name: str, **section: object) -> Bridge:
    torch.manual_seed(0)
    kind = {"fdt": FdtConfig, "codebook": CodebookConfig}.get(name)
    cfg = BridgeConfig(name=name, embed_dim=4, sections={name: kind(**section)} if kind else {})
    return BRIDGES.get(name)(cfg, WIDTHS).double().train()


def _assert_same(compiled: torch.nn.Module, eager: torch.nn.Module) -> None:
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), (_, b) in zip(compiled.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


FDT = {"num_tokens": 16, "dim": 8, "temperature": 0.5, "temperature_decay": 0.5, "temperature_every": 1}
BRIDGE_CASES = {
    "clip": ("clip", {}),
    "fdt lean max-pool, top-k sparsemax": ("fdt", FDT | {"chunk_size": 2}),
    "fdt naive, learned scale, overuse, cosine": (
        "fdt",
        FDT | {"chunk_size": 0, "learnable_scale": True, "overuse_weight": 1.0, "temperature_schedule": "cosine"},
    ),
    "fdt mean pooling, softmax": ("fdt", FDT | {"pooling": "mean", "activation": "softmax"}),
    "codebook vq, dead-code restarts": ("codebook", {"size": 8, "dim": 4, "dead_code_threshold": 1}),
    "codebook vq, k-means init, rotation": (
        "codebook",
        {"size": 8, "dim": 4, "kmeans_init": True, "estimator": "rotation"},
    ),
    "codebook fsq": ("codebook", {"quantizer": "fsq", "fsq_levels": [3, 3]}),
}


@pytest.mark.parametrize("case", sorted(BRIDGE_CASES))
def test_bridge_training_step_compiles_into_one_graph_and_matches_eager(case: str) -> None:
    name, section = BRIDGE_CASES[case]
    compiled = _bridge(name, **section)
    if section.get("kmeans_init"):  # k-means runs once, on the first batch, reading the host: before compiling
        compiled(_features(seed=99))
    eager = copy.deepcopy(compiled)
    counter = CompileCounterWithBackend("eager")  # dynamo only: graph breaks and recompiles
    compiled.compile_hot_path(backend=counter, fullgraph=True)
    for step in range(STEPS):
        feats = _features(seed=step)
        torch.manual_seed(step)  # the codebook draws restart candidates: the same draws on both sides
        loss, parts = compiled.loss(compiled(feats, step), step)
        torch.manual_seed(step)
        eager_loss, eager_parts = eager.loss(eager(feats, step), step)
        loss.backward()
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(parts, eager_parts, rtol=1e-9, atol=1e-12)
        _assert_same(compiled, eager)
        if step == 0:  # a log line between steps: counters restart
            assert compiled.usage() == pytest.approx(eager.usage())
        if step == STEPS - 2:  # compiled by now: the first step, a changed step and temperature, fresh counters
            frames = counter.frame_count
    assert counter.frame_count == frames  # the last step recompiled nothing: no Python number changes per step
    assert compiled.usage() == pytest.approx(eager.usage())


def test_codebook_restarts_happen_in_the_compiled_step() -> None:
    """The tensor-op restart (no nonzero) still moves dead codes onto this batch's encoder vectors."""
    bridge = _bridge("codebook", size=8, dim=4, dead_code_threshold=1)
    before = bridge.codebook.embed.clone()
    bridge.compile_hot_path(backend="eager", fullgraph=True)
    bridge(_features(seed=0))
    moved = (bridge.codebook.embed != before).any(-1)
    assert moved.any() and (bridge.codebook.unused_steps == 0).all()


def _check_function(
    fn: Callable[..., torch.Tensor], eager_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor
) -> None:
    """``fn`` compiled with fullgraph equals ``eager_fn`` on the same inputs, forward and backward."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    torch.manual_seed(1)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
    torch.manual_seed(1)
    ref = eager_fn(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    weights = torch.randn_like(ref).masked_fill(torch.rand_like(ref) > 0.5, 0.0)  # zeros: dead max-pool entries
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for a, b in zip(leaves, inputs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pad_mode", ["neg_inf", "zero"])
def test_grounding_dense_backward_equals_the_sparse_one(pad_mode: str) -> None:
    """Compiled, the lean max-pool takes the fixed-shape path (mask every chunk, dense chunked backward); eager on
    the CPU the host-read path (skip unpadded chunks, sparse backward). Same values and gradients."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(7) < torch.tensor([[7], [4], [1]])

    def pool(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pooled_scores(q, t, mask, 0.3, "max", pad_mode, chunk_size=3)

    _check_function(pool, pool, q, tokens)


def test_vector_quantizer_training_forward_compiles() -> None:
    """Assignment, statistics, EMA update, restarts, usage: one graph; outputs, gradients, buffers as eager."""
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(8, 3, dead_code_threshold=1).double().train()
    eager = copy.deepcopy(vq)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(5) < torch.tensor([[5], [2]])

    def step(quantizer: EMAVectorQuantizer, x: torch.Tensor) -> torch.Tensor:
        out = quantizer({"a": x, "b": 2 * x}, {"a": mask, "b": mask[[1, 0]]})
        return torch.stack([o.quantized.sum() + o.commitment + o.distances.sum() for o in out.values()])

    _check_function(lambda x: step(vq, x), lambda x: step(eager, x), x)
    for (name, a), (_, b) in zip(vq.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert vq.usage_stats() == pytest.approx(eager.usage_stats())
