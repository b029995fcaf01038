"""Attention-side ops against unfused or independent references (double precision, random)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_keye.models.keye_vl.rope import MultimodalRotaryEmbedding, text_position_ids
from megatron_keye.ops.attention.core import sdpa_attention
from megatron_keye.ops.attention.masks import segment_ids_from_cu_seqlens
from megatron_keye.ops.attention.rope import RotaryTables, reference_rotate, rotate_to_bhsd
from megatron_keye.ops.swiglu import swiglu


def random_tables(s, b, d, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(s, b, 1, d // 2, generator=g, dtype=dtype) * 10
    return RotaryTables(cos=angles.cos(), sin=angles.sin())


def test_fused_rope_matches_unfused_and_gradcheck():
    x = torch.randn(5, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    tables = random_tables(5, 2, 8)
    fused = rotate_to_bhsd(x, tables)
    assert fused.shape == (2, 3, 5, 8) and fused.is_contiguous()
    expected = reference_rotate(x, tables).permute(1, 2, 0, 3)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: rotate_to_bhsd(t, tables), (x,))


def test_swiglu_matches_reference_and_gradcheck():
    x = torch.randn(6, 2, 10, dtype=torch.float64, requires_grad=True)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(x), F.silu(gate) * up, rtol=0, atol=0)
    assert torch.autograd.gradcheck(swiglu, (x,))


def test_text_positions_reduce_to_1d_rope():
    """Equal t/h/w ids give exactly the 1D RoPE angles, whatever the sections."""
    rope = MultimodalRotaryEmbedding(head_dim=24, base=1e6, sections=[2, 5, 5])
    angles = rope(text_position_ids(2, 9))  # [s, b, 1, d]
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 24, 2).float() / 24))
    expected = torch.arange(9).float()[:, None] * inv_freq
    torch.testing.assert_close(angles[:, 0, 0, :12], expected, rtol=0, atol=0)
    torch.testing.assert_close(angles[..., :12], angles[..., 12:], rtol=0, atol=0)


def test_mrope_matches_transformers_qwen2_vl():
    """Distinct (t, h, w) ids: our tables + rotation equal transformers' Qwen2-VL M-RoPE."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    sections, head_dim = [4, 4, 4], 24
    config = Qwen2VLTextConfig(
        hidden_size=96, num_attention_heads=4, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
    )
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 300, (3, 2, 11), generator=g)
    q = torch.randn(2, 4, 11, head_dim, generator=g)  # [b, h, s, d]
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, positions)
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
    ours_rope = MultimodalRotaryEmbedding(head_dim=head_dim, base=1e6, sections=sections)
    tables = RotaryTables.from_angles(ours_rope(positions))
    ours = rotate_to_bhsd(q.permute(2, 0, 1, 3).contiguous(), tables)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_mrope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mrope_section"):
        MultimodalRotaryEmbedding(head_dim=24, base=1e4, sections=[4, 4, 5])
    rope = MultimodalRotaryEmbedding(head_dim=24, base=1e4, sections=[4, 4, 4])
    with pytest.raises(ValueError, match=r"\[3, batch, seq\]"):
        rope(torch.zeros(2, 5, dtype=torch.long))


def naive_attention(q, k, v, *, causal, scale, allowed=None):
    """softmax(q k^T * scale) v in float64 on [b, h, s, d] (k/v with fewer heads: GQA)."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * scale
    s_q, s_k = scores.shape[-2:]
    mask = torch.ones(s_q, s_k, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    if allowed is not None:
        mask = mask & allowed
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_sdpa_gqa_causal_matches_naive():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    out = sdpa_attention(q, k, v, causal=True, scale=1 / math.sqrt(8))
    torch.testing.assert_close(out, naive_attention(q, k, v, causal=True, scale=1 / math.sqrt(8)))


def test_packed_samples_never_attend_across_boundaries():
    """A row packing samples of lengths 3, 5, 4 equals attending to each sample alone."""
    g = torch.Generator().manual_seed(1)
    lengths = [3, 5, 4]
    q = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 3, 8, 12])
    segments = segment_ids_from_cu_seqlens(cu, 1, 12)
    assert segments.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]]
    packed = sdpa_attention(q, k, v, causal=True, scale=0.3, segments=segments)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = sdpa_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=True, scale=0.3)
        torch.testing.assert_close(packed[:, :, sl], alone)
        start += n


def test_cu_seqlens_must_cover_rows():
    with pytest.raises(ValueError, match="batch\\*seq"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 3, 7]), 1, 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 3, 3, 8]), 1, 8)
