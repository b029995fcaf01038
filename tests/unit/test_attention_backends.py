"""Backend choice (auto never gives flash-attn an fp32 run) and the flash-attn varlen path's
sample boundaries, checked on CPU against SDPA with a pure-torch stand-in for flash-attn."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_keye.ops.attention import core
from megatron_keye.ops.attention.core import resolve_backend, sdpa_attention
from megatron_keye.ops.attention.flash import flash_attention
from megatron_keye.ops.attention.masks import (
    cu_seqlens_from_segments,
    segment_ids_from_cu_seqlens,
    segment_mask,
)


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal):
    """flash_attn_varlen_func's contract in plain torch: [total, h, d], one sequence per span."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max_k == max(lengths) and dropout_p == 0.0
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, h, L, d]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale,
                                           enable_gqa=ks.size(1) != qs.size(1))
        out[start:end] = o[0].transpose(0, 1)
    return out


def _dense_reference(q, k, v, *, dropout_p, softmax_scale, causal):
    """flash_attn_func's contract in plain torch: [b, s, h, d]."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
        scale=softmax_scale, enable_gqa=k.size(2) != q.size(2))
    return o.transpose(1, 2)


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """An importable `flash_attn` whose kernels are the pure-torch references above."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = _dense_reference
    module.flash_attn_varlen_func = _varlen_reference
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


@pytest.fixture
def cuda_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(core, "_NOTICES_GIVEN", set())


# ------------------------------------------------------------------------- backend choice
def test_auto_never_gives_flash_attn_fp32(fake_flash_attn, cuda_visible, caplog):
    with caplog.at_level(logging.WARNING, logger=core.__name__):
        assert resolve_backend("auto", dtype=torch.float32) == "sdpa"
        assert resolve_backend("auto", dtype=torch.float32) == "sdpa"
    notices = [r for r in caplog.records if "flash-attn takes fp16/bf16 only" in r.getMessage()]
    assert len(notices) == 1, "the fallback is announced once per process"
    assert "float32" in notices[0].getMessage()
    assert resolve_backend("auto", dtype=torch.bfloat16) == "flash"
    assert resolve_backend("auto", dtype=torch.float16) == "flash"


def test_auto_without_flash_attn_or_cuda_is_sdpa(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", dtype=torch.bfloat16) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", dtype=torch.bfloat16) == "sdpa"


def test_explicit_flash_refuses_fp32_and_unknown_names_fail():
    with pytest.raises(ValueError, match="fp16/bf16 only"):
        resolve_backend("flash", dtype=torch.float32)
    assert resolve_backend("flash", dtype=torch.bfloat16) == "flash"
    assert resolve_backend("sdpa", dtype=torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="auto\\|sdpa\\|flash"):
        resolve_backend("xformers", dtype=torch.float32)


def test_core_attention_resolves_with_the_params_dtype(fake_flash_attn, cuda_visible):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    def build(dtype):
        config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                   params_dtype=dtype, bf16=dtype == torch.bfloat16)
        return core.CoreAttention(config, 1, AttnMaskType.causal, "self", backend="auto")

    assert build(torch.float32).backend == "sdpa"
    assert build(torch.bfloat16).backend == "flash"


# ------------------------------------------------------------------- varlen boundaries
# Rows built so that a sample id continues across a row end (row 0 ends with 3, row 1 starts
# with 3; row 1 ends with 5, row 2 starts with 5), plus a row that is a single sample.
CROSSING_SEGMENTS = torch.tensor([
    [0, 0, 1, 1, 1, 3, 3],
    [3, 3, 3, 4, 4, 5, 5],
    [5, 6, 6, 6, 6, 6, 6],
    [9, 9, 9, 9, 9, 9, 9],
])


def _block_diagonal(cu: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] True inside each cu_seqlens span (what the varlen kernel attends within)."""
    ids = segment_ids_from_cu_seqlens(cu, 1, total)[0]
    return ids[:, None] == ids[None, :]


@pytest.mark.parametrize("segments", [
    CROSSING_SEGMENTS,
    torch.zeros(3, 5, dtype=torch.long),                      # one sample per row, equal ids
    torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]),               # one-token samples
    torch.randint(0, 3, (5, 16), generator=torch.Generator().manual_seed(0)).cumsum(1),
], ids=["crossing-ids", "same-id-every-row", "singletons", "random"])
def test_cu_seqlens_restart_every_row_and_match_sdpa_masks(segments):
    b, s = segments.shape
    cu, longest = cu_seqlens_from_segments(segments)
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s
    assert set(range(0, b * s, s)) <= set(cu.tolist()), "every row starts a sample"
    assert longest == int((cu[1:] - cu[:-1]).max())
    blocks = _block_diagonal(cu, b * s).view(b, s, b, s)
    for r in range(b):
        others = [c for c in range(b) if c != r]
        assert not blocks[r, :, others, :].any(), f"row {r} attends into another row"
    # Within a row, the spans are exactly SDPA's same-sample mask (causal: both add tril).
    within = torch.stack([blocks[r, :, r, :] for r in range(b)])[:, None]
    assert torch.equal(within, segment_mask(segments, causal=False))
    tril = torch.ones(s, s, dtype=torch.bool).tril()
    assert torch.equal(within & tril, segment_mask(segments, causal=True))


def test_crossing_ids_are_split_at_the_row_end():
    cu, longest = cu_seqlens_from_segments(CROSSING_SEGMENTS)
    assert cu.tolist() == [0, 2, 5, 7, 10, 12, 14, 15, 21, 28]
    assert longest == 7


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_flash_varlen_path_equals_sdpa(fake_flash_attn, causal, heads, groups):
    """The varlen path driven by our cu_seqlens gives SDPA's per-row-masked output."""
    g = torch.Generator().manual_seed(2)
    b, s, d = CROSSING_SEGMENTS.shape[0], CROSSING_SEGMENTS.shape[1], 8
    q = torch.randn(b, heads, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, groups, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, groups, s, d, generator=g, dtype=torch.float64)
    expected = sdpa_attention(q, k, v, causal=causal, scale=0.35, segments=CROSSING_SEGMENTS)
    out = flash_attention(q, k, v, causal=causal, scale=0.35, segments=CROSSING_SEGMENTS)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_flash_dense_path_equals_sdpa(fake_flash_attn):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        flash_attention(q, k, v, causal=True, scale=0.3),
        sdpa_attention(q, k, v, causal=True, scale=0.3), rtol=1e-12, atol=1e-12)
