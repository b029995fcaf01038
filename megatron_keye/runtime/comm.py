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
