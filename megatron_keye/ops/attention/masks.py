"""Packed-sequence boundaries in the forms the kernels take.

A row of a micro-batch may pack several samples; `segments` [b, s] gives each token its sample
id, a sample being one contiguous run of equal ids within one row. SDPA takes the boolean mask
`segment_mask` builds; flash-attn's varlen kernel takes the cumulative lengths
`cu_seqlens_from_segments` builds over the flattened tokens; `segment_ids_from_cu_seqlens` goes
back from cumulative lengths to ids.
"""

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


def cu_seqlens_from_segments(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths over the flattened [b * s] tokens, and the longest sample.

    A sample starts at every row start and wherever the id changes within a row, so two
    adjacent rows never merge even when one ends and the next begins with the same id.
    Returns (int32 [n + 1] starting at 0 and ending at b * s, max length) as flash-attn's
    varlen kernel takes them.
    """
    b, s = segments.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=segments.device)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def segment_mask(segments: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Where attention is allowed, [b, 1, s, s] (True = attend): same sample, and causal if asked."""
    allowed = segments[:, None, :, None] == segments[:, None, None, :]
    if causal:
        s = segments.size(1)
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    return allowed
