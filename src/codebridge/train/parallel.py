"""Trainer side of torch.distributed: join the torchrun process group, pick the device, synchronise gradients.

Gradients become their mean over ranks in one of two ways (``train.grad_sync``, see ``GradientSync``):

- ``overlap`` (default): torch's ``DistributedDataParallel`` all-reduces gradients in buckets while the backward
  pass is still running, so communication overlaps computation. ``find_unused_parameters``: parameters a bridge
  leaves unused (FDT's summary projections) keep a ``None`` gradient, as in one process (``static_graph``, which
  finds them once instead of every step, makes ranks diverge under accumulation). No buffer sync in forward:
  the codebook keeps its EMA buffers identical on every rank itself (statistics summed over ranks, restarts from
  rank 0), so DDP must not overwrite them with rank 0's copy. Accumulation micro-batches run under ``no_sync``.
- ``manual``: after the whole backward pass, one all-reduce of all gradients flattened together
  (``average_gradients``); kept for comparison (benchmarks/ddp_overlap.py).

``train.shard=fsdp`` replaces DDP by FSDP2 (``fully_shard``) on each tower: a tower's parameters, gradients and
optimizer state live sharded over the ranks and are all-gathered block by block around its forward and backward;
the bridge (small, and read outside its forward by the loss) stays replicated and its gradients are averaged by
``average_gradients``. Checkpoints hold the full unsharded state either way (``model_state``, ``optimizer_state``).

Both are exact: with two ranks, DDP's ``(a / 2) + (b / 2)`` equals ``(a + b) / 2`` bit for bit. The bridges gather
negatives with gradient (``codebridge.distributed``) inside the same backward pass, in the same order on every rank.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
import re
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

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
    """Leave the process group, after every DDP wrapper is gone.

    A DDP reducer holds the process group; if it outlives ``destroy_process_group``, its deallocation runs the gloo
    group's destructor with the GIL held, which joins worker threads that may be waiting for the GIL to free a
    finished collective's tensors: a deadlock at exit (pytorch/pytorch#56297). Close every ``GradientSync`` first;
    the collection here reaps wrappers kept only by reference cycles, while the group is still registered.
    """
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()


def lost_contact(exc: BaseException) -> str | None:
    """The cause, in a few words, when ``exc`` says another rank stopped answering (its process or node died, or the
    network failed); else None. NCCL raises ``DistError``s; gloo raises plain ``RuntimeError``s whose message starts
    with the location in its transport ("[.../gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset by
    peer. This is typically caused by ...")."""
    message = str(exc).strip()
    if not (isinstance(exc, dist.DistError) or "gloo/transport" in message):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", message.splitlines()[0] if message else "")
    return first.split(". ")[0].rstrip(".") or type(exc).__name__


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
    grads = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:  # (sharded gradients are FSDP's: already averaged)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


GradSync = Literal["overlap", "manual"]
Shard = Literal["ddp", "fsdp"]
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_towers(model: nn.Module) -> list[FSDPModule]:
    """FSDP2 on each encoder of ``model`` (in place: its parameters become sharded ``DTensor``s)."""
    towers = []
    for encoder in model.encoders.values():
        fully_shard(encoder)
        towers.append(encoder)
    return towers


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over every gradient, sharded (FSDP) or not: torch's refuses a mix of the two. The total
    norm stays a tensor (no host read here: the trainer reads it together with the loss)."""
    params = [p for p in model.parameters() if p.grad is not None]
    groups = [[p for p in params if isinstance(p.grad, DTensor) is sharded] for sharded in (True, False)]
    if not groups[0]:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in groups if group]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict (collective when sharded: every rank calls it, rank 0 gets the tensors, on the CPU)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes it; a sharded model keeps its own shards)."""
    if is_sharded(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the indices of a plain ``optimizer.state_dict()``)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` of the full parameters, indexed as in one process (collective when sharded)."""
    plain = optimizer.state_dict()
    if not is_sharded(model):
        return plain
    full = get_optimizer_state_dict(model, optimizer, options=FULL).get("state", {})  # empty but on rank 0
    names = _names(model, optimizer)
    return {"state": {i: full[n] for i, n in enumerate(names) if n in full}, "param_groups": plain["param_groups"]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what ``optimizer_state`` gave (every rank passes it)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = _names(model, optimizer)
    groups, start = [], 0
    for group in state["param_groups"]:
        groups.append({**group, "params": names[start : start + len(group["params"])]})
        start += len(group["params"])
    by_name = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch that stops it copying rank 0's buffers over the others' in every forward (renamed in torch
    2.13; the new one also syncs them once at construction, harmless: they start equal)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class _TrainingLoss(nn.Module):
    """The model's training loss as a ``forward``: DDP prepares its gradient hooks only in its module's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, step: int) -> Any:
        return self.model.loss(batch, step)


class GradientSync:
    """Computes the micro-batch losses of a step and makes the step's gradients their mean over ranks.

    Call ``loss`` once per micro-batch (then backward), ``accum_steps`` times, then ``finish`` before clipping:
    only the last micro-batch's backward communicates (``overlap``); ``manual`` all-reduces in ``finish``. In one
    process both are ``model.loss``. The model itself stays unwrapped (saving, evaluation and state dicts as ever),
    except that ``shard="fsdp"`` shards its towers in place (state dicts: ``model_state``, ``optimizer_state``).

    ``static_graph`` (benchmarks only) replaces DDP's per-step search for unused parameters by a one-off one; DDP
    then counts gradient hooks per step, which accumulation breaks (ranks silently diverge), so it needs
    ``accum_steps`` 1.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: GradSync,
        accum_steps: int = 1,
        *,
        static_graph: bool = False,
        shard: Shard = "ddp",
    ) -> None:
        if static_graph and accum_steps > 1:
            raise ValueError(f"static_graph needs accum_steps 1, got {accum_steps}")
        self.model = model
        self.accum_steps = accum_steps
        self.calls = 0  # loss() calls since the last finish()
        self.ddp: DistributedDataParallel | None = None
        self.towers: list[FSDPModule] = []
        if shard == "fsdp" and is_distributed():
            self.towers = shard_towers(model)
        elif mode == "overlap" and is_distributed():
            device = next(model.parameters()).device
            self.ddp = DistributedDataParallel(
                _TrainingLoss(model),
                device_ids=[device.index] if device.type == "cuda" else None,
                **_no_buffer_sync(),
                find_unused_parameters=not static_graph,
                static_graph=static_graph,
            )

    def loss(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """``model.loss(batch, step)``; under ``overlap`` its backward all-reduces only on the step's last call."""
        self.calls += 1
        for tower in self.towers:  # FSDP reduce-scatters the towers' gradients in the step's last backward only
            tower.set_requires_gradient_sync(self.calls >= self.accum_steps)
        if self.ddp is None:
            return self.model.loss(batch, step)
        if self.calls >= self.accum_steps:
            return self.ddp(batch, step)
        with self.ddp.no_sync():  # DDP decides in its forward whether the backward communicates
            return self.ddp(batch, step)

    def close(self) -> None:
        """Drop the DDP wrapper (and its reducer's hold on the process group) before the group is destroyed."""
        self.ddp = None

    def finish(self) -> None:
        """After the step's last backward: gradients are the mean over ranks from here on."""
        if self.ddp is None:
            average_gradients(self.model)
        self.calls = 0
