"""Trainer side of torch.distributed: join the torchrun process group, pick the device, average gradients.

Gradients are averaged with one flat all-reduce instead of DDP: the bridges already gather negatives with
gradient (``codebridge.distributed``), and parameters a bridge leaves unused (FDT's summary projections) need
no ``find_unused_parameters`` bookkeeping.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from codebridge.distributed import is_distributed, world_size


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_minutes: float = 30.0) -> tuple[torch.device, bool]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU).

    ``timeout_minutes`` (``train.dist_timeout_minutes``) bounds every wait for another rank: it must cover rank 0's
    evaluations and saves, and it is how long a frozen rank holds the others before the run fails.
    Returns this process's device and whether the group was created here (and so is to be destroyed here).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not launched_by_torchrun() or is_distributed():
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return device, True


def shutdown_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def rank_zero_says(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "the time budget is spent"), so all ranks stop at the same step."""
    if not is_distributed():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


@torch.no_grad()
def broadcast_state(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all ranks start from the same weights."""
    if not is_distributed():
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def average_gradients(model: nn.Module) -> None:
    """Replace each gradient by its mean over ranks (one all-reduce of all gradients flattened together).

    Every rank runs the same graph, so the same parameters have gradients everywhere; a parameter without a
    gradient (unused by the loss) keeps ``None`` and is skipped by the optimizer, as in one process.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
