"""GPU check of the context-parallel ring's block kernels (part of `tools/gpu_check.sh`).

The ring's correctness on CPU is tested against full-row attention; on a GPU its blocks run
other kernels (flash-attn's, or the masked one in bf16). One GPU cannot hold a CP=2 NCCL world,
so this checks the kernels themselves: a causal and a full block's output, log-sum-exp and the
backward given a merged output and lse (the ring's contract), in bf16 against an fp32 reference
of the same math, GQA included.
"""

from __future__ import annotations

import torch

from megatron_keye.ops.attention import flash_blocks
from megatron_keye.ops.attention.local_kernels import masked_block_backward, masked_block_forward

BF16_RTOL = 2e-2


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_block_kernels(device: str, *, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per (kernel, causal): the largest relative error over out/lse/dq/dk/dv."""
    torch.manual_seed(0)
    b, heads, kv, s, d = 2, 8, 2, 256, 128
    scale = d ** -0.5
    q = torch.randn(b, heads, s, d, device=device)
    k, v = torch.randn(b, kv, s, d, device=device), torch.randn(b, kv, s, d, device=device)
    extra_k, extra_v = torch.randn_like(k), torch.randn_like(v)
    rows = []
    kernels = {"masked": None}
    if flash_blocks.usable(q.to(dtype)):
        kernels["flash-attn"] = flash_blocks
    for causal in (True, False):
        mask = torch.ones(s, s, dtype=torch.bool, device=device)
        mask = (mask.tril() if causal else mask).expand(b, 1, s, s)
        ref_out, ref_lse = masked_block_forward(q, k, v, mask, scale=scale)
        full_mask = torch.cat([mask, torch.ones_like(mask)], dim=-1)
        merged_out, merged_lse = masked_block_forward(
            q, torch.cat([k, extra_k], 2), torch.cat([v, extra_v], 2), full_mask, scale=scale)
        grad = torch.randn_like(merged_out)
        ref_grads = masked_block_backward(grad, q, k, v, merged_out, merged_lse, mask,
                                          scale=scale)
        low = [t.to(dtype) for t in (q, k, v, grad, merged_out)]
        for name, module in kernels.items():
            if module is None:
                out, lse = masked_block_forward(*low[:3], mask, scale=scale)
                grads = masked_block_backward(low[3], *low[:3], low[4], merged_lse, mask,
                                              scale=scale)
            else:
                out, lse = module.block_forward(*low[:3], causal=causal, scale=scale)
                grads = module.block_backward(low[3], *low[:3], low[4], merged_lse,
                                              causal=causal, scale=scale)
            errors = [_relative(out, ref_out), _relative(lse, ref_lse)]
            errors += [_relative(g, r) for g, r in zip(grads, ref_grads, strict=True)]
            worst = max(errors)
            rows.append({"kernel": name, "causal": causal, "max_rel_err": worst,
                         "passed": worst < BF16_RTOL})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["CP ring block kernels (bf16 vs fp32 reference; out, lse, dq, dk, dv):",
             f"{'kernel':<12} {'mask':<7} {'max rel err':>12}  ok"]
    for r in rows:
        lines.append(f"{r['kernel']:<12} {'causal' if r['causal'] else 'full':<7} "
                     f"{r['max_rel_err']:>12.2e}  {'yes' if r['passed'] else 'NO'}")
    return "\n".join(lines)
