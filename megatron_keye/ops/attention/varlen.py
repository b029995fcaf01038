"""Attention over packed variable-length sequences without a dense mask (SDPA backend).

A packed row holds many independent sequences (ViT images and video frames, packed samples);
masking a whole row would form an N×N matrix over every token of the batch. Instead the
sequences are cut out of the row (consecutive sequences of one length together, as one dense
batch [n_sequences, heads, length, d]) and run through SDPA unmasked (or causal within a
sequence), and the outputs are concatenated in row order. Work and memory are those of the
sequences alone; the equal-size frames of a video are one SDPA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_keye.ops.attention.masks import cu_seqlens_from_segments


def varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segments: torch.Tensor,
                causal: bool, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention of [b, h, s, d] inputs restricted to each token's own sequence.

    `segments` [b, s] gives each token its sequence id; a sequence is a run of equal ids within
    one row (`cu_seqlens_from_segments`). K/V may have fewer heads (GQA). Returns [b, h, s, d].
    Consecutive sequences of one length (the frames of a video) are one SDPA batch taken as a
    strided view, no gather; the outputs are concatenated back in row order.
    """
    b, h, s, d = q.shape
    cu, _ = cu_seqlens_from_segments(segments)
    bounds = cu.tolist()
    gqa = k.size(1) != q.size(1)
    rows = []
    # unbind/split (not indexing) so the backward is one stack/cat, not a zero-filled full-size
    # gradient per piece.
    for row, (q_row, k_row, v_row) in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0),
                                                   strict=True)):
        runs = _runs(bounds, row * s, (row + 1) * s)
        sizes = [length * count for _, length, count in runs]
        pieces = []
        for (_, length, count), qg, kg, vg in zip(runs, q_row.split(sizes, dim=1),
                                                  k_row.split(sizes, dim=1),
                                                  v_row.split(sizes, dim=1), strict=True):
            qg, kg, vg = (t.unflatten(1, (count, length)).transpose(0, 1) for t in (qg, kg, vg))
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal,
                                                 dropout_p=dropout, scale=scale, enable_gqa=gqa)
            pieces.append(out.transpose(0, 1).reshape(h, count * length, d))
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows) if b > 1 else rows[0].unsqueeze(0)


def _runs(bounds: list[int], row_start: int, row_end: int) -> list[tuple[int, int, int]]:
    """(first token, length, count) of each run of consecutive equal-length sequences whose
    tokens lie in [row_start, row_end) of the flattened (b, s) tokens."""
    runs: list[list[int]] = []
    for first, end in zip(bounds[:-1], bounds[1:], strict=True):
        if first < row_start or end > row_end:
            continue
        length = end - first
        if runs and runs[-1][1] == length:
            runs[-1][2] += 1
        else:
            runs.append([first, length, 1])
    return [tuple(run) for run in runs]
