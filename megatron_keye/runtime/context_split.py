"""Cutting a micro-batch into this context-parallel rank's zig-zag share.

The model step calls `split_for_context_parallel` on every micro-batch when CP > 1: every
per-token field ([b, s]: tokens, labels, loss_weights, sample_ids; [3, b, s]: position_ids) keeps
this rank's tokens in zig-zag order, and `positions` [b, s/CP] records where each of them sits in
its full row, which is what causal masks compare. Labels were shifted on the full row by the
producer, so a split never separates a token from its target. Packed rows (`sample_ids`) are cut
sample by sample, so every sample is balanced across ranks; each sample's length must be a
multiple of 2×CP (the packer pads them).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_keye.data.batch import POSITION_FIELDS, TOKEN_FIELDS
from megatron_keye.ops.attention.zigzag import packed_zigzag_indices, zigzag_indices


def row_positions(batch: Mapping[str, torch.Tensor], *, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[b, s/CP] positions (within each full row) of the tokens this rank keeps."""
    tokens = batch["tokens"]
    rows, seq = tokens.shape
    if seq % (2 * cp_size):
        raise ValueError(
            f"data.seq_length: a row of {seq} tokens cannot be cut into 2 x context = "
            f"{2 * cp_size} chunks"
        )
    sample_ids = batch.get("sample_ids")
    if sample_ids is None:
        index = zigzag_indices(seq, cp_size, cp_rank, device=tokens.device)
        return index.unsqueeze(0).expand(rows, -1)
    per_row = []
    for row in range(rows):
        _, lengths = torch.unique_consecutive(sample_ids[row], return_counts=True)
        try:
            per_row.append(packed_zigzag_indices(lengths.tolist(), cp_size, cp_rank,
                                                 device=tokens.device))
        except ValueError as err:
            raise ValueError(f"batch row {row}: {err}") from None
    return torch.stack(per_row)


def split_for_context_parallel(
    batch: Mapping[str, torch.Tensor], *, cp_size: int, cp_rank: int
) -> dict[str, torch.Tensor]:
    """This rank's zig-zag share of a micro-batch, plus its `positions`."""
    positions = row_positions(batch, cp_size=cp_size, cp_rank=cp_rank)
    out = dict(batch)
    for name in TOKEN_FIELDS:
        if name in batch:
            out[name] = torch.gather(batch[name], 1, positions)
    for name in POSITION_FIELDS:
        if name in batch:
            ids = batch[name]
            out[name] = torch.gather(ids, 2, positions.unsqueeze(0).expand(ids.shape[0], -1, -1))
    out["positions"] = positions
    return out
