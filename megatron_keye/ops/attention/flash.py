"""flash-attn backend (GPU only; imported lazily by CoreAttention when selected)."""

from __future__ import annotations

import torch

from megatron_keye.ops.attention.masks import cu_seqlens_from_segments


def flash_attention(q, k, v, *, causal: bool, scale: float, segments=None,
                    dropout: float = 0.0) -> torch.Tensor:
    """flash-attn on [b, h, s, d] inputs (GQA native); returns [b, h, sq, d].

    Packed rows (`segments` [b, s]) go through the varlen kernel, one sequence per sample;
    samples restart at every row (`cu_seqlens_from_segments`).
    """
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "model.attention_backend='flash' needs the flash-attn package "
            "(pip install megatron-keye[gpu]); use 'sdpa' otherwise"
        ) from err
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [b, s, h, d]
    if segments is None:
        out = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    b, s = segments.shape
    cu, longest = cu_seqlens_from_segments(segments)
    out = flash_attn_varlen_func(
        q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
        v.reshape(b * s, *v.shape[2:]), cu, cu, longest, longest,
        dropout_p=dropout, softmax_scale=scale, causal=causal,
    )
    return out.view(b, s, *out.shape[1:]).transpose(1, 2)
