"""``CodeBridgeModel.compile_step`` (``train.compile``): compiled encoders and bridge train like eager ones.

The default suite runs dynamo's graph capture and AOT autograd (backend "aot_eager": the graphs inductor would get,
without generating C++), so it takes seconds; the inductor run through the trainer is in
tests/test_trainer.py::test_compiled_towers_train_like_eager_ones (marked slow).
"""

from __future__ import annotations

import copy

import pytest
import torch

from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.models.model import CodeBridgeModel
from codebridge.train.optim import build_optimizer
from helpers import small_config

torch.set_num_threads(1)
CAPTIONS = ["a red square", "a blue circle", "green triangle on white", "the yellow star"]


def batch(seed: int) -> dict:
    """A training batch as the loader delivers it: uint8 pixels with jitter factors, padded token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (4, 6), generator=g)
    mask = torch.arange(6).expand(4, 6) < torch.tensor([[6], [3], [5], [2]])
    return {
        "index": torch.arange(4),
        "image": {
            "pixels": torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g),
            "jitter": 0.8 + 0.4 * torch.rand(4, 3, generator=g),
        },
        "text": {"ids": ids * mask, "mask": mask},
    }


@pytest.mark.parametrize("bridge", ["clip", "fdt", "codebook"])
def test_compiled_step_gives_the_eager_losses_and_weights(bridge: str) -> None:
    cfg = small_config()
    cfg.model.bridge.name = bridge
    torch.manual_seed(0)
    eager = CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text)))
    compiled = copy.deepcopy(eager)
    compiled.compile_step(backend="aot_eager")
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.train()
        optimizer = build_optimizer(model, cfg.train)
        losses = []
        for step in range(3):
            optimizer.zero_grad()
            loss, _ = model.loss(batch(step), step)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs[name] = losses
    assert compiled.encoders.image._compiled_call_impl is not None  # it really ran compiled
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-5, atol=1e-6)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and saved models unchanged
    for key, value in compiled.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[key], rtol=1e-4, atol=1e-6)
