"""Context-parallel attention equals full-row attention (fp32, random inputs, gloo ranks).

One spawned world per CP size runs every case (transport × causal × packing) and returns each
rank's output and dq/dk/dv; here they are put back into full rows and compared with plain SDPA
over the whole row with an explicit mask (the CP=1 reference).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_cp import case_inputs, cp_attention_worker, row_indices

TOLERANCE = 1e-5
SEQ = 64
# Packed rows: 3 samples (adjacent, equal ids never repeat) and 2 samples; multiples of 2×4.
PACKED_ROWS = [[16, 24, 24], [40, 24]]
UNPACKED_ROWS = [[SEQ], [SEQ]]


def _case(comm, *, cp, causal=True, packed=False, heads=None, a2a_size=1, seed=0, **extra):
    if heads is None:
        heads = (8, 4) if cp == 4 else (4, 2)
    return {"comm": comm, "causal": causal, "packed": packed, "heads": heads[0],
            "kv_heads": heads[1], "rows": PACKED_ROWS if packed else UNPACKED_ROWS, "seq": SEQ,
            "seed": seed, "a2a_size": a2a_size, **extra}


def cases_for(cp: int) -> dict:
    comms = [("p2p", 1), ("a2a", 1), ("allgather", 1), ("a2a+p2p", 2)]
    cases = {}
    for comm, a2a in comms:
        tag = comm if comm != "a2a+p2p" else f"a2a{a2a}+p2p"
        for packed in (False, True):
            kind = "packed" if packed else "unpacked"
            cases[f"{tag}-causal-{kind}"] = _case(comm, cp=cp, packed=packed, a2a_size=a2a,
                                                  seed=len(cases))
        cases[f"{tag}-noncausal-unpacked"] = _case(comm, cp=cp, causal=False, a2a_size=a2a,
                                                   seed=len(cases))
        # A packed row whose last sample changes: the other samples must not notice.
        cases[f"{tag}-causal-packed-perturbed"] = dict(cases[f"{tag}-causal-packed"],
                                                       perturb=True)
    cases["p2p-noncausal-packed"] = _case("p2p", cp=cp, causal=False, packed=True, seed=50)
    # Another layout (contiguous shards): the ring's masked block kernel instead of flash.
    for comm, a2a in comms:
        if comm == "a2a+p2p" and cp == 2:
            continue
        for packed in (False, True):
            kind = "packed" if packed else "unpacked"
            cases[f"{comm}-causal-{kind}-contiguous"] = _case(
                comm, cp=cp, packed=packed, a2a_size=a2a, seed=80 + len(cases),
                layout="contiguous")
    if cp == 2:  # half precision runs through the same kernels (fp32 merge and accumulators)
        for comm in ("p2p", "a2a", "allgather"):
            for packed in (False, True):
                cases[f"{comm}-causal-{'packed' if packed else 'unpacked'}-bf16"] = _case(
                    comm, cp=cp, packed=packed, seed=70 + len(cases), dtype="bfloat16",
                    tolerance=2e-2)
    if cp == 4:  # GQA with 2 query heads per K/V head, and the ring with more groups per head
        cases["p2p-causal-unpacked-gqa4:2"] = _case("p2p", cp=4, heads=(4, 2), seed=60)
        cases["a2a2+p2p-causal-packed-gqa4:2"] = _case("a2a+p2p", cp=4, heads=(4, 2),
                                                       packed=True, a2a_size=2, seed=61)
    return cases


def reference(case: dict) -> dict:
    """Full-row attention and gradients through autograd (one process, explicit mask)."""
    data = case_inputs(case)
    dtype = getattr(torch, case.get("dtype", "float32"))  # the same rounded inputs, in fp32
    q, k, v = (data[name].to(dtype).float().requires_grad_() for name in ("q", "k", "v"))
    s = case["seq"]
    allowed = torch.ones(len(case["rows"]), 1, s, s, dtype=torch.bool)
    if case["causal"]:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    if data["segments"] is not None:
        seg = data["segments"]
        allowed &= seg[:, None, :, None] == seg[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=case.get("scale", 0.35),
                                         enable_gqa=True)
    out.backward(data["grad"].to(dtype).float())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def assemble(case: dict, per_rank: list[dict], key: str) -> torch.Tensor:
    """A full-row tensor from every rank's zig-zag piece."""
    pieces = [r[key] for r in per_rank]
    full = torch.full((pieces[0].size(0), pieces[0].size(1), case["seq"], pieces[0].size(3)),
                      float("nan"))
    for rank, piece in enumerate(pieces):
        idx = row_indices(case, len(pieces), rank)
        for row in range(full.size(0)):
            full[row, :, idx[row]] = piece[row]
    return full


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@functools.cache
def world(cp: int) -> dict:
    cases = cases_for(cp)
    per_rank = run_workers(cp_attention_worker, cp, timeout=240.0, cases=cases)
    return {"cases": cases, "per_rank": per_rank}


def _results(cp: int, name: str) -> tuple[dict, list[dict]]:
    w = world(cp)
    return w["cases"][name], [r["results"][name] for r in w["per_rank"]]


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_matches_full_rows(cp):
    failures, report = [], []
    for name, case in cases_for(cp).items():
        case, per_rank = _results(cp, name)
        expected = reference(case)
        for key in ("out", "dq", "dk", "dv"):
            actual = assemble(case, per_rank, key)
            err = relative_error(actual, expected[key])
            report.append(f"cp={cp} {name} {key}: rel {err:.1e} "
                          f"max {(actual - expected[key]).abs().max().item():.1e}")
            if not err <= case.get("tolerance", TOLERANCE):
                failures.append(report[-1])
    print("\n".join(report))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("cp", [2, 4])
def test_packed_sample_is_isolated_from_its_row_neighbours(cp):
    for name in cases_for(cp):
        if not name.endswith("-perturbed"):
            continue
        case, perturbed = _results(cp, name)
        _, plain = _results(cp, name.removesuffix("-perturbed"))
        keep = sum(case["rows"][0][:-1])  # row 0's untouched samples
        for key in ("out", "dq", "dk", "dv"):
            a, b = assemble(case, perturbed, key), assemble(case, plain, key)
            assert not torch.equal(a[0, :, keep:], b[0, :, keep:]), (name, key)
            torch.testing.assert_close(a[0, :, :keep], b[0, :, :keep], rtol=1e-6, atol=1e-7,
                                       msg=f"{name} {key}: row 0's other samples changed")
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@pytest.mark.parametrize("cp", [2, 4])
def test_bad_transport_settings_are_refused_naming_the_fields(cp):
    errors = world(cp)["per_rank"][0]["errors"]
    assert "parallel.context" in errors["a2a"] and "parallel.cp_comm" in errors["a2a"]
    assert "parallel.cp_comm" in errors["a2a+p2p"]
    assert "parallel.cp_comm" in errors["bogus"]


def test_block_plan_takes_flash_only_for_zigzag_layouts():
    from megatron_keye.ops.attention.context_parallel import block_plan
    from megatron_keye.ops.attention.zigzag import packed_zigzag_indices, zigzag_indices

    cp, s = 4, 32
    pos = [zigzag_indices(s, cp, r).expand(2, -1) for r in range(cp)]
    kinds = {(qr, kr): [p[3] for p in block_plan(pos[qr], pos[kr], None, None, causal=True,
                                                 cp_size=cp, q_rank=qr, k_rank=kr)]
             for qr in range(cp) for kr in range(cp)}
    assert kinds[(1, 1)] == ["causal"] and kinds[(2, 0)] == ["full"]
    assert kinds[(0, 3)] == ["full"]
    # equal work per block off the diagonal: half the queries or half the keys
    plan = block_plan(pos[2], pos[0], None, None, causal=True, cp_size=cp, q_rank=2, k_rank=0)
    assert plan[0][1:3] == (slice(0, s // cp), slice(0, s // cp // 2))
    plan = block_plan(pos[0], pos[2], None, None, causal=True, cp_size=cp, q_rank=0, k_rank=2)
    assert plan[0][1:3] == (slice(s // cp // 2, s // cp), slice(0, s // cp))
    # packed rows: the same schedule sample by sample (both rows hold samples of 8 and 24)
    lengths = [8, 24]
    ppos = [packed_zigzag_indices(lengths, cp, r).expand(2, -1) for r in range(cp)]
    pseg = torch.repeat_interleave(torch.arange(2), torch.tensor([2, 6])).expand(2, -1)
    plan = block_plan(ppos[0], ppos[2], pseg, pseg, causal=True, cp_size=cp, q_rank=0, k_rank=2)
    assert [(p[1], p[2], p[3]) for p in plan] == [
        (slice(1, 2), slice(0, 2), "full"), (slice(5, 8), slice(2, 8), "full")]
    # another layout (contiguous shards) falls back to the masked kernel
    contiguous = torch.arange(8).expand(2, -1)
    plan = block_plan(contiguous, contiguous, None, None, causal=True, cp_size=cp, q_rank=0,
                      k_rank=0)
    assert [p[3] for p in plan] == ["masked"]
    # a2a+p2p (a2a over ranks {0, 1} and {2, 3}): sorted by position, an a2a group's tokens are
    # the zig-zag layout of the 2-rank ring, so the ring across groups takes the flash schedule.
    inner = torch.cat([pos[0], pos[1]], dim=1).sort(dim=1).values
    assert torch.equal(inner, zigzag_indices(s, 2, 0).expand(2, -1))


def test_block_kernels_match_sdpa_and_survive_fully_masked_rows():
    from megatron_keye.ops.attention import local_kernels as lk

    g = torch.Generator().manual_seed(3)
    b, h, kv, s, d = 2, 4, 2, 12, 8
    q, k, v, grad = (torch.randn(b, n, s, d, generator=g) for n in (h, kv, kv, h))
    for causal in (True, False):
        mask = torch.ones(s, s, dtype=torch.bool)
        mask = (mask.tril() if causal else mask).expand(b, 1, s, s)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=0.3,
                                             enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad)
        out, lse = lk.flash_block_forward(q, k, v, causal=causal, scale=0.3)
        flash_grads = lk.flash_block_backward(grad, q, k, v, out, lse, causal=causal, scale=0.3)
        m_out, m_lse = lk.masked_block_forward(q, k, v, mask, scale=0.3)
        masked_grads = lk.masked_block_backward(grad, q, k, v, m_out, m_lse, mask, scale=0.3)
        for actual in (out, m_out):
            torch.testing.assert_close(actual, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, m_lse, rtol=1e-5, atol=1e-5)
        for grads in (flash_grads, masked_grads):
            for actual, expected in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # Queries 0..3 see nothing in this block: lse -inf, output and gradients exact zeros.
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[:, :, 4:, :3] = True
    out, lse = lk.masked_block_forward(q, k, v, mask, scale=0.3)
    dq, dk, dv = lk.masked_block_backward(grad, q, k, v, out, lse, mask, scale=0.3)
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    assert (out[:, :, :4] == 0).all() and (dq[:, :, :4] == 0).all()
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert (dk[:, :, 3:] == 0).all() and (dv[:, :, 3:] == 0).all()
    # merging an empty block changes nothing, two empty ones stay empty (no NaN)
    merged, merged_lse = lk.merge_partial(out.float(), lse, torch.zeros_like(out),
                                          torch.full_like(lse, float("-inf")))
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
