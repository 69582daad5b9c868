"""torch.distributed helpers shared by the bridges (negatives across ranks) and the trainer."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's own slice.

    The backward pass sums the gradients of all ranks for this rank's slice, so with gradients averaged
    over ranks afterwards, N processes x batch B train exactly like one process with batch N*B.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum over ranks of its slice's gradient.

    Ours rather than ``torch.distributed.nn.functional.all_gather``, which torch deprecates with a warning on every
    call. Equal row counts on every rank (the trainer's batches are).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        if dist.get_backend() == dist.Backend.NCCL:
            grad = grad.contiguous()
            own = torch.empty(grad.shape[0] // world_size(), *grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(own, grad)
            return own
        grad = grad.clone(memory_format=torch.contiguous_format)  # gloo has no reduce-scatter: reduce a copy
        dist.all_reduce(grad)
        return grad.chunk(world_size(), dim=0)[rank()]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks, without gradient (for logging and statistics)."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()
