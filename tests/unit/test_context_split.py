"""The CP batch split: every rank's zig-zag share, merged back, is the original micro-batch."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl.rope import text_position_ids
from megatron_keye.ops.attention.zigzag import merge_from_ranks, zigzag_indices
from megatron_keye.runtime.context_split import split_for_context_parallel


def batch(rows=2, seq=16, packed=None):
    g = torch.Generator().manual_seed(0)
    out = {
        "tokens": torch.randint(0, 100, (rows, seq), generator=g),
        "labels": torch.randint(0, 100, (rows, seq), generator=g),
        "loss_weights": (torch.rand(rows, seq, generator=g) < 0.7).float(),
        "position_ids": text_position_ids(rows, seq),
        "pixel_values": torch.randn(5, 3, 14, 14, generator=g),  # not per token: untouched
    }
    if packed is not None:
        out["sample_ids"] = torch.tensor(packed)
    return out


def merged(parts, field, cp):
    rows = parts[0][field].shape[-2] if field == "position_ids" else parts[0][field].shape[0]
    dim = 2 if field == "position_ids" else 1
    out = []
    for row in range(rows):
        pieces = [p[field].select(dim - 1, row).unsqueeze(dim - 1) for p in parts]
        index = [p["positions"][row] for p in parts]
        out.append(merge_from_ranks(pieces, index, dim=dim))
    return torch.cat(out, dim=dim - 1)


@pytest.mark.parametrize("cp", [2, 4])
def test_unpacked_split_is_zigzag_and_merges_back(cp):
    b = batch()
    parts = [split_for_context_parallel(b, cp_size=cp, cp_rank=r) for r in range(cp)]
    for r, part in enumerate(parts):
        assert torch.equal(part["positions"][0], zigzag_indices(16, cp, r))
        assert part["tokens"].shape == (2, 16 // cp)
        assert part["position_ids"].shape == (3, 2, 16 // cp)
        assert part["pixel_values"] is b["pixel_values"]
    # rank 0 of CP=2 holds chunks 0 and 3 of 4: positions 0-3 and 12-15
    if cp == 2:
        assert parts[0]["positions"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    for field in ("tokens", "labels", "loss_weights", "position_ids"):
        assert torch.equal(merged(parts, field, cp), b[field]), field


def test_packed_rows_are_cut_sample_by_sample():
    packed = [[0] * 8 + [1] * 4 + [2] * 4, [5] * 4 + [6] * 12]
    b = batch(packed=packed)
    parts = [split_for_context_parallel(b, cp_size=2, cp_rank=r) for r in range(2)]
    # row 0, rank 1: chunks 1 and 2 of sample 0 (2,3,4,5), then of samples 1 (9,10) and 2 (13,14)
    assert parts[1]["positions"][0].tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    for part in parts:  # every rank holds half of every sample
        for row, ids in enumerate(packed):
            for sample in set(ids):
                assert (part["sample_ids"][row] == sample).sum() * 2 == ids.count(sample)
    for field in ("tokens", "labels", "loss_weights", "position_ids", "sample_ids"):
        assert torch.equal(merged(parts, field, 2), b[field]), field


def test_a_sample_that_cannot_be_balanced_is_named():
    b = batch(packed=[[0] * 6 + [1] * 10, [0] * 16])
    with pytest.raises(ValueError, match=r"batch row 0: a sample of 6 tokens .* multiple of 4"):
        split_for_context_parallel(b, cp_size=2, cp_rank=0)


def test_packed_position_ids_restart_per_sample():
    from megatron_keye.models.keye_vl.rope import packed_text_position_ids

    ids = packed_text_position_ids(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5] * 6 + [6] * 2]))
    assert ids.shape == (3, 2, 8)
    assert ids[0].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[1], ids[2])
