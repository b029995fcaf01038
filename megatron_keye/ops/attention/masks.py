"""Helpers that turn packed-sequence boundaries into per-token sample ids."""

from __future__ import annotations

import torch


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Sample id of every token, [batch, seq], from cumulative lengths over the flattened tokens.

    `cu_seqlens` = [0, l0, l0+l1, ..., batch*seq] indexes tokens in (batch, sequence) row-major
    order; a boundary must fall on every row end so no sample straddles two rows.
    """
    total = batch * seq
    cu = cu_seqlens.to(torch.int64)
    if cu[0].item() != 0 or cu[-1].item() != total:
        raise ValueError(f"cu_seqlens must run from 0 to batch*seq={total}, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    if (lengths <= 0).any():
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu.tolist()}")
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    return ids.view(batch, seq)
