"""The flash-attn block adapter of the context-parallel ring, against flash-attn's interface.

flash-attn cannot run here (CUDA only), so each of its two 2.x interface generations is stood in
for by a module with the same function signatures and return shapes, computing attention
in plain torch on [b, s, h, d] tensors (GQA native, log-sum-exp in [b, h, s], the backward
writing into caller-owned dq/dk/dv as flash-attn does). What this checks is ours: argument
binding by name, layouts, GQA, which returned value is the log-sum-exp, and that the backward
with the merged output and lse gives our masked kernel's gradients. The CUDA kernels themselves
are exercised by tools/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import types

import pytest
import torch

from megatron_keye.ops.attention import flash_blocks
from megatron_keye.ops.attention.local_kernels import masked_block_backward, masked_block_forward


def _probs(q, k, causal, scale):
    """[b, h, sq, sk] probabilities and [b, h, sq] lse from [b, s, h, d] inputs."""
    heads, kv = q.size(2), k.size(2)
    kx = k.repeat_interleave(heads // kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kx.double()) * scale
    if causal:
        sq, sk = q.size(1), k.size(1)
        allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


def _forward(q, k, v, dropout_p, softmax_scale, causal):
    probs, lse = _probs(q, k, causal, softmax_scale)
    vx = v.repeat_interleave(q.size(2) // v.size(2), dim=2).double()
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vx).to(q.dtype)
    return out, lse.float()


def _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal):
    heads, kv = q.size(2), k.size(2)
    group = heads // kv
    kx = k.repeat_interleave(group, dim=2).double()
    vx = v.repeat_interleave(group, dim=2).double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kx) * softmax_scale
    if causal:
        sq, sk = q.size(1), k.size(1)
        scores = scores.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq),
                                    float("-inf"))
    probs = torch.exp(scores - softmax_lse.double().unsqueeze(-1))  # the given (merged) lse
    d_out = dout.double()
    delta = (d_out * out.double()).sum(-1).transpose(1, 2)  # [b, h, sq]
    d_probs = torch.einsum("bqhd,bkhd->bhqk", d_out, vx)
    d_scores = probs * (d_probs - delta.unsqueeze(-1)) * softmax_scale
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", d_scores, kx))
    b, sk, _, d = k.shape
    dk.copy_(torch.einsum("bhqk,bqhd->bkhd", d_scores, q.double())
             .view(b, sk, kv, group, d).sum(3))
    dv.copy_(torch.einsum("bhqk,bqhd->bkhd", probs, d_out).view(b, sk, kv, group, d).sum(3))
    return torch.empty(0)


def _newer_interface():
    """flash-attn >= 2.6: window_size_left/right, softcap; the forward returns 4 values."""

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                            window_size_right, softcap, alibi_slopes, return_softmax):
        assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0)
        out, lse = _forward(q, k, v, dropout_p, softmax_scale, causal)
        return out, lse, torch.empty(0), torch.empty(2)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p,
                             softmax_scale, causal, window_size_left, window_size_right, softcap,
                             alibi_slopes, deterministic, rng_state=None):
        return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)

    return types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward,
                                 _flash_attn_backward=_flash_attn_backward)


def _older_interface():
    """flash-attn 2.3-2.5: one window_size pair; the forward returns 8 values (lse 6th)."""

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size,
                            alibi_slopes, return_softmax):
        assert tuple(window_size) == (-1, -1)
        out, lse = _forward(q, k, v, dropout_p, softmax_scale, causal)
        return out, q, k, v, out, lse, None, torch.empty(2)

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p,
                             softmax_scale, causal, window_size, alibi_slopes, deterministic,
                             rng_state=None):
        return _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)

    return types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward,
                                 _flash_attn_backward=_flash_attn_backward)


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("interface", [_newer_interface, _older_interface],
                         ids=["flash_attn>=2.6", "flash_attn<2.6"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_adapter_matches_masked_kernel_forward_and_merged_backward(monkeypatch, interface, causal):
    monkeypatch.setattr(flash_blocks, "_interface", interface)
    torch.manual_seed(0)
    b, heads, kv, sq, d = 2, 4, 2, 8, 16
    sk = sq if causal else 12
    scale = d ** -0.5
    q = torch.randn(b, heads, sq, d)
    k, v = torch.randn(b, kv, sk, d), torch.randn(b, kv, sk, d)
    mask = (torch.ones(sq, sk, dtype=torch.bool).tril() if causal
            else torch.ones(sq, sk, dtype=torch.bool)).expand(b, 1, sq, sk)
    out, lse = flash_blocks.block_forward(q, k, v, causal=causal, scale=scale)
    ref_out, ref_lse = masked_block_forward(q, k, v, mask, scale=scale)
    assert out.shape == q.shape and lse.shape == (b, heads, sq) and lse.dtype == torch.float32
    assert _relative(out, ref_out) < 1e-6 and _relative(lse, ref_lse) < 1e-6
    # The ring's backward: this block's gradients from a merged output and lse of more keys
    # (here: an extra block of keys the queries also saw).
    extra_k, extra_v = torch.randn(b, kv, 6, d), torch.randn(b, kv, 6, d)
    all_mask = torch.cat([mask, torch.ones(b, 1, sq, 6, dtype=torch.bool)], dim=-1)
    merged_out, merged_lse = masked_block_forward(
        q, torch.cat([k, extra_k], 2), torch.cat([v, extra_v], 2), all_mask, scale=scale)
    grad = torch.randn_like(merged_out)
    got = flash_blocks.block_backward(grad, q, k, v, merged_out, merged_lse, causal=causal,
                                      scale=scale)
    want = masked_block_backward(grad, q, k, v, merged_out, merged_lse, mask, scale=scale)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert _relative(g, w) < 1e-6, name


def test_flash_blocks_are_used_only_where_they_run():
    q = torch.randn(1, 2, 4, 16)
    assert not flash_blocks.usable(q)  # CPU: torch's own flash kernel serves the ring
    assert not flash_blocks.usable(q.bfloat16())
