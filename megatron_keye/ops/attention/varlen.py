"""Attention over packed variable-length sequences without a dense mask (SDPA backend).

A packed row holds many independent sequences (ViT images and video frames, packed samples);
masking a whole row would form an N×N matrix over every token of the batch. Instead the
sequences are grouped by length, each group is gathered into one dense batch
[n_sequences, heads, length, d] and run through SDPA unmasked (or causal within a sequence), and
the outputs are put back in row order. Work and memory are those of the sequences alone; a batch
of equal-size frames is one SDPA call.
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
    """
    b, h, s, d = q.shape
    cu, _ = cu_seqlens_from_segments(segments)
    starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    # Tokens flattened over (b, s): [h, b*s, d].
    flat = [t.transpose(0, 1).reshape(t.size(1), b * s, t.size(-1)) for t in (q, k, v)]
    pieces, order = [], []
    for length in torch.unique(lengths).tolist():
        first = starts[lengths == length]
        index = first[:, None] + torch.arange(length, device=first.device)  # [n, length]
        qg, kg, vg = (t[:, index].transpose(0, 1) for t in flat)  # [n, heads, length, d]
        out = F.scaled_dot_product_attention(
            qg, kg, vg, is_causal=causal, dropout_p=dropout, scale=scale,
            enable_gqa=kg.size(1) != qg.size(1),
        )
        pieces.append(out.transpose(0, 1).reshape(h, -1, d))
        order.append(index.reshape(-1))
    gathered = torch.cat(pieces, dim=1)  # [h, b*s, d] in group order
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.numel(), device=inverse.device)
    return gathered[:, inverse].view(h, b, s, d).transpose(0, 1)
