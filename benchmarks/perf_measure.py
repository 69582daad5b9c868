"""How benchmarks/perf.py measures: interleaved wall-clock timings, allocator peak memory, FLOPs and matmul peak.

Every figure of the benchmark is a ratio of two measurements taken in the same run, so the methods here only need
to treat both sides alike: the variants of one comparison are timed round-robin (a load spike from the other
users of a shared machine hits all of them), and memory is the allocator's peak of live bytes above what was
live before the call, on CPU read from the profiler's allocation events, on CUDA from the caching allocator.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with the device's queued work finished on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """``repeats`` timings of every function, run round-robin (a, b, c, a, b, c, ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during ``fn`` above those live when it starts (tensors ``fn`` frees count while live).

    CPU: the profiler records every allocation and free of the CPU allocator with a running total, so the peak is
    the largest total less the one before the call. CUDA: ``max_memory_allocated`` after a reset.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in sorted(events, key=lambda e: e.get("ts", 0)) if e.get("name") == "[memory]"]
    if not memory:
        return 0
    # the running total counts every block allocated while any profile was on and still live, so start from the
    # total before this call's first event; frees of blocks allocated before any profile are not counted at all
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, *(m["Total Allocated"] - base for m in memory))


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> int:
    """2*M*K*N for dense a, 2*nnz*N for sparse a: torch's counter would count a sparse product as dense."""
    rows_times_inner = a._nnz() if a.is_sparse else a.shape[0] * a.shape[1]
    return 2 * rows_times_inner * b.shape[1]


def _mm(a, b, *args, out_val=None, **kwargs) -> int:
    return _matmul(a, b)


def _addmm(bias, a, b, *args, out_val=None, **kwargs) -> int:
    return _matmul(a, b)


for _raw in (_mm, _addmm):
    _raw._get_raw = True  # FlopCounterMode passes these the tensors, not their shapes

# torch's counter knows the CUDA attention kernels, not the CPU one; and it counts sparse products as dense
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    torch.ops.aten.mm: _mm,
    torch.ops.aten.addmm: _addmm,
    torch.ops.aten.addmm_: _addmm,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention ``fn`` runs (forward and backward), as torch counts them
    (plus the formulas above)."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_times(device: torch.device, size: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` fp32 [size, size] @ [size, size] products: this machine's matmul throughput."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=g)
    b = torch.randn(size, size, device=device, generator=g)
    return interleaved_times({"mm": lambda: a @ b}, device, repeats)["mm"]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    """What the figures were measured on; the load average shows how busy the shared machine was."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
