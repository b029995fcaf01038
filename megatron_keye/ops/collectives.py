"""Small collectives for bookkeeping (loss sums, counts, memory peaks) on the right device.

NCCL only moves CUDA tensors and gloo only CPU ones, so every bookkeeping collective in the
package goes through `all_reduce_values`, which puts its tensor on the device of the group's
backend and hands the result back on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

CPU = torch.device("cpu")


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a collective on `group` (default: the world) needs its tensors on."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return CPU


def all_reduce_values(
    values: torch.Tensor | Sequence[float],
    *,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """All-reduce `values` over `group` on the backend's device; returns a new CPU tensor."""
    tensor = torch.as_tensor(values, dtype=dtype).detach()
    tensor = tensor.to(comm_device(group), copy=True)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.cpu()


class _SumOverGroup(torch.autograd.Function):
    """y = Σ_ranks x on every rank; its adjoint sums the incoming gradients the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def sum_over_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum of a model tensor over `group` (e.g. per-sequence sums under CP).

    Under context parallelism a sequence-level quantity (a DPO log-ratio, a GSPO importance
    ratio) is a sum over tokens that live on different CP ranks. This gives every rank the full
    sum, and back-propagates each rank's share of the gradient exactly once: count the
    sequence's loss on one CP rank only (`context_parallel_rank() == 0`), and every rank's
    tokens still receive dL/dsum. (megatron-core's own reduction would scale such gradients by
    the group size.)
    """
    if dist.get_world_size(group) == 1:
        return x
    return _SumOverGroup.apply(x, group)
