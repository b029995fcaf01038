"""The zig-zag sequence layout of context parallelism.

A row of S tokens is cut into 2×CP equal chunks; CP rank r holds chunk r followed by chunk
2·CP−1−r, so under a causal mask every rank does the same attention work. With packed rows
(several samples per row, each padded to a multiple of 2×CP) the cut is applied to every sample
separately, so every sample is balanced too. Everything that splits a batch for CP (tokens,
labels, masks, position ids, sample ids) or rebuilds a full row from the pieces uses these
index maps, so the model step, the attention kernels and the tests agree on one layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def zigzag_indices(seq_length: int, cp_size: int, cp_rank: int, *,
                   device: torch.device | None = None) -> torch.Tensor:
    """Global positions (within the row) of the tokens CP rank `cp_rank` holds, in its order."""
    return packed_zigzag_indices([seq_length], cp_size, cp_rank, device=device)


def packed_zigzag_indices(sample_lengths: Sequence[int], cp_size: int, cp_rank: int, *,
                          device: torch.device | None = None) -> torch.Tensor:
    """Like `zigzag_indices` for a row holding samples of these lengths, back to back.

    Each length must be a multiple of 2×CP; rank r takes chunks r and 2·CP−1−r of every sample.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside a context-parallel group of {cp_size}")
    pieces, start = [], 0
    for length in sample_lengths:
        if length % (2 * cp_size):
            raise ValueError(
                f"a sample of {length} tokens cannot be split into 2 x CP = {2 * cp_size} equal "
                f"chunks; pad every sample to a multiple of {2 * cp_size}"
            )
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk, device=device))
        start += length
    if not pieces:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(pieces)


def split_for_rank(tensor: torch.Tensor, indices: torch.Tensor, *, dim: int) -> torch.Tensor:
    """This rank's tokens of a full-row tensor (`indices` from the functions above)."""
    return tensor.index_select(dim, indices.to(tensor.device))


def merge_from_ranks(pieces: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], *,
                     dim: int) -> torch.Tensor:
    """The full row from every rank's piece (the inverse of `split_for_rank`)."""
    order = torch.cat([i.to(pieces[0].device) for i in indices])
    stacked = torch.cat(list(pieces), dim=dim)
    out = torch.empty_like(stacked)
    out.index_copy_(dim, order, stacked)
    return out


def sample_lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    """[0, l0, l0+l1, …] → [l0, l1, …]."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
