"""Worker and shared inputs for the context-parallel attention tests (tests/distributed/test_cp_attention.py).

A case is a small dict (comm, heads, causal, sample lengths per row, seed); `case_inputs`
rebuilds its full-row tensors deterministically, so the spawned ranks and the test's CP=1
reference see the same numbers.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

DIM = 8


def case_inputs(case: dict) -> dict:
    """Full rows: q [b, h, S, d], k/v [b, kv, S, d], grad [b, h, S, d], segments [b, S] or None."""
    g = torch.Generator().manual_seed(case["seed"])
    b, s, h, kv = len(case["rows"]), case["seq"], case["heads"], case["kv_heads"]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float()

    data = {"q": rand(b, h, s, DIM), "k": rand(b, kv, s, DIM), "v": rand(b, kv, s, DIM),
            "grad": rand(b, h, s, DIM), "segments": None}
    if case["packed"]:
        data["segments"] = torch.stack([
            torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            for lengths in case["rows"]
        ])
    if case.get("perturb"):  # change every input of row 0's last sample
        start = sum(case["rows"][0][:-1])
        for name in ("q", "k", "v", "grad"):
            data[name][0, :, start:] = rand(*data[name][0, :, start:].shape)
    return data


def row_indices(case: dict, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[b, s_local] positions this CP rank holds (zig-zag per sample for packed rows)."""
    from megatron_keye.ops.attention.zigzag import packed_zigzag_indices

    if case.get("layout") == "contiguous":  # not zig-zag: rank r holds the r-th 1/CP of each row
        s_local = case["seq"] // cp_size
        return torch.arange(cp_rank * s_local, (cp_rank + 1) * s_local).expand(len(case["rows"]), -1)
    return torch.stack([
        packed_zigzag_indices(lengths if case["packed"] else [case["seq"]], cp_size, cp_rank)
        for lengths in case["rows"]
    ])


def _local(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.stack([x[i].index_select(dim - 1, idx[i]) for i in range(x.size(0))])


def run_case(case: dict, group) -> dict:
    from megatron_keye.ops.attention.context_parallel import context_parallel_attention

    n, r = dist.get_world_size(group), dist.get_rank(group)
    data = case_inputs(case)
    idx = row_indices(case, n, r)
    dtype = getattr(torch, case.get("dtype", "float32"))
    q, k, v = (_local(data[name], idx, 2).to(dtype).requires_grad_() for name in ("q", "k", "v"))
    segments = None if data["segments"] is None else _local(data["segments"], idx, 1)
    # CoreAttention hands over [s, b, h, d] tensors permuted to [b, h, s, d] (not contiguous).
    q_in, k_in, v_in = (t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for t in (q, k, v))
    out = context_parallel_attention(
        q_in, k_in, v_in, causal=case["causal"], scale=case.get("scale", 0.35), positions=idx,
        segments=segments, group=group, comm=case["comm"], a2a_size=case.get("a2a_size", 1),
    )
    assert out.dtype == dtype and out.shape == q.shape
    out.backward(_local(data["grad"], idx, 2).to(dtype))
    return {key: t.float() for key, t in
            {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}.items()}


def cp_attention_worker(cases: dict) -> dict:
    """Run every case on this rank of a gloo world (the whole world is the CP group)."""
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    results, seconds = {}, {}
    for name, case in cases.items():
        start = time.perf_counter()
        results[name] = run_case(case, group)
        seconds[name] = time.perf_counter() - start
    errors = {}
    n = dist.get_world_size(group)
    for comm, kv_heads in (("a2a", n // 2), ("a2a+p2p", 1), ("bogus", 2)):
        if kv_heads < 1:
            continue
        bad = {"comm": comm, "rows": [[32], [32]], "seq": 32, "packed": False, "heads": 4,
               "kv_heads": kv_heads, "causal": True, "seed": 0, "a2a_size": 2}
        try:
            run_case(bad, group)
        except ValueError as err:
            errors[comm] = str(err)
    return {"results": results, "seconds": seconds, "errors": errors}
