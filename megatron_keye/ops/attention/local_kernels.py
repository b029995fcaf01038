"""Attention over one block of keys that also returns the log-sum-exp (context-parallel pieces).

Context-parallel attention computes a rank's queries against one K/V block at a time and merges
the partial outputs by their log-sum-exp; its backward runs every block again with the MERGED
output and log-sum-exp. The kernels here take [b, h, sq, d] queries and [b, kv_heads, sk, d]
keys/values (GQA: h % kv_heads == 0, query head i reads K/V head i // (h / kv_heads)) and return
the output with its log-sum-exp [b, h, sq] (fp32):

- `masked_block_forward` / `masked_block_backward`: an explicit boolean mask [b, 1|h, sq, sk]
  (True = attend); a query row with nothing allowed in the block gets lse = -inf and contributes
  nothing (no NaN forward or backward). Scores of this one block are formed.
- `flash_block_forward` / `flash_block_backward`: a flash kernel, either unmasked or causal with
  aligned query/key indices; no score matrix. On CPU torch's own
  (`aten._scaled_dot_product_flash_attention_for_cpu`, which has no GQA: unmasked blocks fold the
  query heads of one K/V head into the sequence, causal blocks expand K/V); on GPUs flash-attn's
  (`flash_blocks`, where `block_flash_usable`).
"""

from __future__ import annotations

import torch

from megatron_keye.ops.attention import flash_blocks

_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, h, s, ...] → [b, kv_heads, h / kv_heads, s, ...] (a view)."""
    b, h = x.shape[:2]
    return x.view(b, kv_heads, h // kv_heads, *x.shape[2:])


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf rows replaced by 0, so exp(score - lse) is 0 (not NaN) where all is masked."""
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def _grouped_mask(mask: torch.Tensor) -> torch.Tensor:
    """[b, 1|h, sq, sk] → broadcastable against [b, kv, g, sq, sk] scores."""
    if mask.size(1) == 1:
        return mask.unsqueeze(1)
    raise ValueError("masked block kernels take a mask shared by all heads: [b, 1, sq, sk]")


def masked_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, h, sq, d] in q's dtype, lse [b, h, sq] fp32) of q against this block."""
    kv = k.size(1)
    qg = _grouped(q, kv).float()
    scores = torch.einsum("bkgqd,bksd->bkgqs", qg, k.float()) * scale
    scores = scores.masked_fill(~_grouped_mask(mask), NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse).unsqueeze(-1))
    out = torch.einsum("bkgqs,bksd->bkgqd", probs, v.float())
    b, h, sq = q.shape[:3]
    return out.reshape(b, h, sq, -1).to(q.dtype), lse.reshape(b, h, sq)


def masked_block_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          mask: torch.Tensor, *, scale: float,
                          delta: torch.Tensor | None = None):
    """(dq, dk, dv) of this block, given the MERGED output and log-sum-exp of the queries.

    `delta` = rowsum(grad_out * out) [b, h, sq] may be passed in when computed once for all blocks.
    Returns fp32 gradients.
    """
    kv = k.size(1)
    if delta is None:
        delta = (grad_out.float() * out.float()).sum(-1)
    qg, gog = _grouped(q, kv).float(), _grouped(grad_out, kv).float()
    kf, vf = k.float(), v.float()
    scores = torch.einsum("bkgqd,bksd->bkgqs", qg, kf) * scale
    scores = scores.masked_fill(~_grouped_mask(mask), NEG_INF)
    probs = torch.exp(scores - _finite(_grouped(lse, kv)).unsqueeze(-1))
    dv = torch.einsum("bkgqs,bkgqd->bksd", probs, gog)
    dprobs = torch.einsum("bkgqd,bksd->bkgqs", gog, vf)
    dscores = probs * (dprobs - _grouped(delta, kv).unsqueeze(-1)) * scale
    dq = torch.einsum("bkgqs,bksd->bkgqd", dscores, kf)
    dk = torch.einsum("bkgqs,bkgqd->bksd", dscores, qg)
    return dq.reshape(q.shape), dk, dv


def _fold_queries(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, h, s, ...] → [b, kv_heads, (h / kv_heads) * s, ...]: query heads of a K/V head in a row."""
    b, h = x.shape[:2]
    return x.reshape(b, kv_heads, (h // kv_heads) * x.size(2), *x.shape[3:])


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, kv, s, d = x.shape
    return x.unsqueeze(2).expand(b, kv, heads // kv, s, d).reshape(b, heads, s, d)


def block_flash_usable(q: torch.Tensor) -> bool:
    """Whether a flash block kernel takes these queries: always on CPU; on GPUs flash-attn in
    fp16/bf16 (otherwise the masked kernel runs)."""
    return q.device.type == "cpu" or flash_blocks.usable(q)


def flash_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse fp32) of q against the whole block; causal = query i sees keys 0..i (sq == sk)."""
    if q.device.type != "cpu":
        return flash_blocks.block_forward(q, k, v, causal=causal, scale=scale)
    b, h, sq, d = q.shape
    kv = k.size(1)
    if causal:
        if kv != h:
            k, v = _expand_kv(k, h), _expand_kv(v, h)
        out, lse = _FLASH_FWD(q, k, v, 0.0, True, scale=scale)
        return out, lse.float().contiguous()
    out, lse = _FLASH_FWD(_fold_queries(q, kv), k, v, 0.0, False, scale=scale)
    return out.reshape(b, h, sq, d), lse.float().reshape(b, h, sq).contiguous()


def flash_block_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, causal: bool,
                         scale: float):
    """(dq, dk, dv) of this block given the MERGED output and log-sum-exp of the queries."""
    if q.device.type != "cpu":
        return flash_blocks.block_backward(grad_out, q, k, v, out, lse, causal=causal,
                                           scale=scale)
    b, h, sq, d = q.shape
    kv = k.size(1)
    out, lse = out.to(q.dtype), lse.float()
    if causal:
        ke, ve = (_expand_kv(k, h), _expand_kv(v, h)) if kv != h else (k, v)
        dq, dk, dv = _FLASH_BWD(grad_out.to(q.dtype), q, ke, ve, out, lse, 0.0, True, scale=scale)
        if kv != h:
            dk = dk.view(b, kv, h // kv, *dk.shape[2:]).sum(2)
            dv = dv.view(b, kv, h // kv, *dv.shape[2:]).sum(2)
        return dq, dk, dv
    dq, dk, dv = _FLASH_BWD(
        _fold_queries(grad_out.to(q.dtype), kv), _fold_queries(q, kv), k, v,
        _fold_queries(out, kv), lse.reshape(b, kv, -1).contiguous(),
        0.0, False, scale=scale,
    )
    return dq.reshape(b, h, sq, d), dk, dv


def merge_partial(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
                  block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's (out, lse) into the running fp32 (out, lse); -inf rows stay exact zeros."""
    new = torch.logaddexp(lse, block_lse)
    safe = _finite(new)
    merged = (torch.exp(lse - safe).unsqueeze(-1) * out
              + torch.exp(block_lse - safe).unsqueeze(-1) * block_out.float())
    return merged, new
