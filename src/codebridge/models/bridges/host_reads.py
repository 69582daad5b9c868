"""Whether a bridge may read a tensor's value on the host in the training step.

Reading a value (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, boolean-mask indexing) costs nothing on the
CPU in eager mode: there is no device to wait for, so the bridges keep their data-dependent CPU fast paths there
(adaptive top-k sparsemax, the sparse max-pool backward, masking only the padded chunks). On an accelerator every
such read stalls the host until the device has run all queued work, and under ``torch.compile`` it breaks the graph;
there the same results come from fixed-shape tensor operations (docs/performance.md, *GPU: what was removed from the
discrete steps*; tests/test_compile_clean.py checks it with ``fullgraph=True``).
"""

from __future__ import annotations

import torch


def host_reads_free(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values on the host is free: a CPU tensor outside ``torch.compile``."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()
