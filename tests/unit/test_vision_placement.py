"""The vision placement plan: pad/grid count checks, the cost split of items over CP ranks and
the all-to-all routes (every embedding reaches the rank holding its pad, exactly once)."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl.vision_placement import (
    VisionLayout,
    assign_items,
    check_counts,
    item_costs,
    plan_placement,
    tokens_per_item,
)
from megatron_keye.ops.attention.zigzag import zigzag_indices


def layout_of(mask: torch.Tensor, cp: int, sample_ids=None) -> VisionLayout:
    """The full layout every rank would all-gather, from the zig-zag split of `mask` [b, s]."""
    rows, seq = mask.shape
    owner = torch.zeros(rows, seq, dtype=torch.long)
    local = torch.zeros(rows, seq, dtype=torch.long)
    for rank in range(cp):
        index = zigzag_indices(seq, cp, rank)
        owner[:, index] = rank
        local[:, index] = torch.arange(index.numel())
    return VisionLayout(mask=mask, owner=owner, local=local, sample_ids=sample_ids)


def test_costs_weigh_a_slow_frame_like_several_fast_ones():
    grids = torch.tensor([[1, 32, 32], [1, 8, 8], [1, 8, 8], [1, 8, 8], [1, 8, 8], [1, 8, 8]])
    costs = item_costs(grids, hidden=64, ffn_hidden=256)
    # Quadratic attention: the 1024-patch frame costs more than 16 x a 64-patch frame's share.
    assert costs[0] > 16 * costs[1]
    owner = assign_items(costs, 2)
    assert owner[0] != owner[1] and len(set(owner[1:])) == 1  # the big frame alone
    assert assign_items(costs, 2) == owner  # deterministic


def test_routes_deliver_every_embedding_to_its_pad_once():
    torch.manual_seed(0)
    grids = torch.tensor([[1, 4, 6], [1, 2, 4], [1, 4, 4], [1, 2, 2], [1, 4, 4], [1, 2, 2]])
    counts = tokens_per_item(grids, 2)
    rows, seq, cp = 2, 64, 4
    mask = torch.zeros(rows, seq, dtype=torch.bool)
    mask[0, 5:11] = True  # 6 pads of item 0
    mask[1, [3, 4]] = True  # item 1
    mask[1, 20:24] = True
    mask[1, 30] = True
    mask[1, 40:44] = True
    mask[1, 50] = True
    layout = layout_of(mask, cp)
    check_counts(layout, counts)
    costs = item_costs(grids, hidden=48, ffn_hidden=96)
    plans = [plan_placement(layout, counts, costs, cp_size=cp, cp_rank=r) for r in range(cp)]
    assert sorted(i for p in plans for i in p.items) == list(range(len(counts)))
    assert all(len(p.items) < len(counts) for p in plans)  # no rank encodes everything
    for a in range(cp):
        for b in range(cp):
            assert plans[a].send_counts[b] == plans[b].recv_counts[a]
    # Each rank receives exactly the pads it holds, at their local columns.
    for rank, plan in enumerate(plans):
        held = (layout.owner == rank) & mask
        got = torch.zeros_like(mask)
        got[plan.rows, zigzag_indices(seq, cp, rank)[plan.cols]] = True
        assert torch.equal(got, held)
        assert plan.rows.numel() == int(held.sum())


def test_count_mismatch_names_row_and_sample():
    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 1 and 2 tokens
    counts = tokens_per_item(grids, 2)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    check_counts(layout_of(mask, 1, ids), counts)
    bad = mask.clone()
    bad[0, 2] = True  # sample 0 holds 2 pads: item 0 and half of item 1
    with pytest.raises(ValueError, match="batch row 0, sample 0.*end inside vision item 1"):
        check_counts(layout_of(bad, 1, ids), counts)
    with pytest.raises(ValueError, match="from item 2 on have no image/video pad"):
        check_counts(layout_of(mask, 1, ids), counts + [4])
