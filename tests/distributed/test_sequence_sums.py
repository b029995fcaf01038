"""Sequence-level sums under context parallelism: the loss and every token's gradient equal the
unsplit sequence's, with the loss counted on one CP rank only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_keye.testing.distributed import run_workers


def sequence_loss_worker(*, values: torch.Tensor, cp: int):
    import torch.distributed as dist

    from megatron_keye.ops.attention.zigzag import zigzag_indices
    from megatron_keye.ops.collectives import sum_over_group
    from megatron_keye.runtime.parallel import init_distributed

    init_distributed()
    rank = dist.get_rank()
    index = zigzag_indices(values.shape[1], cp, rank)
    local = values[:, index].clone().requires_grad_(True)  # [sequences, tokens/CP]
    # a DPO-like sequence loss: -logsigmoid(beta * sum of per-token terms)
    total = sum_over_group((local.tanh() * 0.7).sum(dim=1), dist.group.WORLD)
    loss = -F.logsigmoid(0.5 * total).sum()
    counted = loss if rank == 0 else loss * 0.0  # each sequence counted once over CP
    counted.backward()
    return {"loss": loss.item(), "grad": local.grad, "index": index}


def test_sequence_sums_over_cp_give_the_unsplit_loss_and_gradients():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 16, generator=g)
    (one,) = run_workers(sequence_loss_worker, 1, values=values, cp=1)
    parts = run_workers(sequence_loss_worker, 2, values=values, cp=2)
    full = torch.zeros_like(values)
    for part in parts:
        assert abs(part["loss"] - one["loss"]) < 1e-6
        full[:, part["index"]] = part["grad"]
    torch.testing.assert_close(full, one["grad"], rtol=1e-6, atol=1e-7)
