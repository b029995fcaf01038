"""Per-sample sums over packed, context-parallel rows: the sequence-level quantities of the heads.

DPO/BCO log-ratios, reward scores and GSPO ratios are sums over the tokens of one sample. A row
may pack several samples (`sample_ids` [b, s], 0, 0, 1, 1, 1, ...; without it a row is one
sample) and under context parallelism each rank holds only its zig-zag share of every sample.
`sample_sums` adds per-token values into one slot per (row, sample id) with `scatter_add`, then
adds the slots over the CP group with `ops.collectives.sum_over_group`, whose backward hands every
rank the full dL/dsum for its own tokens. Convention that makes the gradients exact: a head counts
each sequence-level loss on one CP rank only (`counted_on_this_cp_rank`), every rank calls the
helper the same number of times in the same order, and token-level terms are counted on every
rank as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_keye.data.batch import CHOSEN, REJECTED
from megatron_keye.ops.collectives import all_reduce_values, sum_over_group


def context_parallel_group() -> dist.ProcessGroup | None:
    """The CP group when context parallelism is on, else None (sums stay local)."""
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def counted_on_this_cp_rank() -> bool:
    """Whether sequence-level losses are counted here (CP rank 0; always true without CP)."""
    if context_parallel_group() is None:
        return True
    return parallel_state.get_context_parallel_rank() == 0


def num_sample_slots(sample_ids: torch.Tensor | None, *,
                     group: dist.ProcessGroup | None) -> int:
    """Slots per row: 1 + the largest sample id over this rank's tokens and the CP group's."""
    local = 1 if sample_ids is None or sample_ids.numel() == 0 else int(sample_ids.max()) + 1
    if sample_ids is not None and sample_ids.numel() and int(sample_ids.min()) < 0:
        raise ValueError(f"sample_ids: must be >= 0, got {int(sample_ids.min())}")
    if group is None:
        return local
    return int(all_reduce_values([local], op=dist.ReduceOp.MAX, group=group)[0])


def sample_sums(values: torch.Tensor, sample_ids: torch.Tensor | None, *, num_slots: int,
                group: dist.ProcessGroup | None) -> torch.Tensor:
    """[b, num_slots] sums of per-token `values` [b, s] by sample id, over the whole CP group.

    Differentiable in `values` (see the module docstring for the counting convention).
    """
    rows, _ = values.shape
    if sample_ids is None:
        local = values.sum(dim=1, keepdim=True)
        if num_slots > 1:
            local = torch.cat([local, local.new_zeros(rows, num_slots - 1)], dim=1)
    else:
        local = values.new_zeros(rows, num_slots).scatter_add(1, sample_ids.long(), values)
    if group is None:
        return local
    return sum_over_group(local, group)


@dataclass
class PackedPairs:
    """Where the preference pairs of a micro-batch sit: slot (row, sample) of each side."""

    num_slots: int
    rows: torch.Tensor  # [pairs] row of each pair
    chosen: torch.Tensor  # [pairs] sample id of the chosen response
    rejected: torch.Tensor  # [pairs] sample id of the rejected response (= chosen + 1)
    slot_tokens: torch.Tensor  # [b, num_slots] completion tokens per sample (whole CP group)

    @property
    def count(self) -> int:
        return int(self.rows.numel())

    def pick(self, per_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) entries [pairs] of a [b, num_slots] per-sample tensor."""
        return per_slot[self.rows, self.chosen], per_slot[self.rows, self.rejected]


def find_pairs(pair_role: torch.Tensor, sample_ids: torch.Tensor | None,
               completion: torch.Tensor, *, group: dist.ProcessGroup | None) -> PackedPairs:
    """Locate the pairs of a (CP-local) micro-batch: a chosen sample followed by its rejected one.

    `pair_role` [b, s] is 1/2 per token (0 = not in a pair), `completion` [b, s] the float mask
    of the tokens whose log-probs count. Raises naming the row and sample when a chosen sample is
    not followed by a rejected one, or a sample mixes roles.
    """
    num_slots = num_sample_slots(sample_ids, group=group)
    rows = pair_role.shape[0]
    ids = (sample_ids if sample_ids is not None
           else torch.zeros_like(pair_role)).long()
    role = pair_role.long()
    with torch.no_grad():
        high = role.new_zeros(rows, num_slots).scatter_reduce(1, ids, role, "amax")
        low = role.new_full((rows, num_slots), 3).scatter_reduce(1, ids, role, "amin")
        tokens = sample_sums(completion.detach().float(), sample_ids, num_slots=num_slots,
                             group=group)
    if group is not None:
        high = all_reduce_values(high, op=dist.ReduceOp.MAX, group=group,
                                 dtype=torch.int64).to(role.device)
        low = all_reduce_values(low, op=dist.ReduceOp.MIN, group=group,
                                dtype=torch.int64).to(role.device)
    present = low <= 2
    mixed = present & (high != low)
    if bool(mixed.any()):
        row, sample = (int(v) for v in mixed.nonzero()[0])
        raise ValueError(f"pair_role: sample {sample} of row {row} mixes roles")
    role_of = torch.where(present, high, torch.zeros_like(high))
    chosen_at = (role_of == CHOSEN).nonzero()
    rows_idx, chosen = chosen_at[:, 0], chosen_at[:, 1]
    rejected = chosen + 1
    ok = rejected < num_slots
    if bool(ok.all()):
        ok = role_of[rows_idx, rejected] == REJECTED
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0])
        raise ValueError(f"pair_role: chosen sample {int(chosen[bad])} of row "
                         f"{int(rows_idx[bad])} is not followed by a rejected sample")
    orphans = (role_of == REJECTED).sum() - rows_idx.numel()
    if int(orphans):
        raise ValueError(f"pair_role: {int(orphans)} rejected sample(s) without a chosen one "
                         f"just before them")
    return PackedPairs(num_slots=num_slots, rows=rows_idx, chosen=chosen, rejected=rejected,
                       slot_tokens=tokens)
