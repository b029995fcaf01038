"""The planner's answer as a table or as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from megatron_keye.planning.plan import LayoutEstimate, PlanResult


def to_json_dict(result: PlanResult, *, top: int | None = None) -> dict:
    """Everything: inputs, model, FLOPs per token, ranked layouts and the rejected ones."""
    inputs = result.inputs
    ranked = result.ranked[:top] if top else result.ranked
    return {
        "inputs": {
            "model": asdict(inputs.model),
            "seq": inputs.seq,
            "cluster": asdict(inputs.cluster),
            "micro_batch": inputs.micro_batch,
            "global_batch": inputs.resolved_global_batch,
            "precision": inputs.precision,
            "recompute": inputs.recompute,
            "cp_comm": inputs.cp_comm,
            "vpp": inputs.vpp,
            "gemm_efficiency": inputs.gemm_efficiency,
            "attention_efficiency": inputs.attention_efficiency,
            "dp_overlap": inputs.dp_overlap,
            "visual_tokens_per_row": inputs.resolved_visual_tokens_per_row,
        },
        "model": {**asdict(result.shape), "total_params": result.shape.total_params},
        "flops_per_token": result.flops_per_token,
        "feasible_count": len(result.ranked),
        "ranked": [e.to_dict() for e in ranked],
        "rejected": [e.to_dict() for e in result.rejected],
    }


def to_json(result: PlanResult, *, top: int | None = None) -> str:
    return json.dumps(to_json_dict(result, top=top), indent=2)


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _gib(x: float) -> str:
    return f"{x:.1f}" if x >= 0.95 else f"{x:.3g}"


def _row(rank: int, e: LayoutEstimate) -> list[str]:
    m = e.memory.to_dict()
    ring = {None: "-", True: "yes", False: "NO"}[e.overlap_ok]
    if e.comm.ring is not None:
        ring += f" ({e.comm.ring.margin:.1f}x)"
    return [str(rank), e.layout.name, _gib(m['params'] + m['main_params'] + m['grads']),
            _gib(m['optimizer']), _gib(m['activations']), _gib(m['logits'] + m['transient']),
            _gib(m['total']), str(e.num_microbatches), f"{e.step_s:.2f}",
            f"{e.tokens_per_s / e.layout.world:,.0f}", f"{e.mfu:.1%}", ring]


_HEADER = ["#", "layout", "w+g GiB", "adam GiB", "act GiB", "logit+tmp", "total GiB", "m",
           "step s", "tok/s/GPU", "MFU", "ring overlap"]


def format_table(result: PlanResult, *, top: int = 10) -> str:
    """Header lines (model, FLOPs/token, cluster) and the top layouts, fastest first."""
    i, s, c = result.inputs, result.shape, result.inputs.cluster
    f = result.flops_per_token
    lines = [
        f"model {i.model.flavor}: {_count(s.total_params)} parameters "
        f"({_count(s.matmul_params)} in matmuls), {s.layers} layers, hidden {s.hidden}, "
        f"heads {s.heads}/{s.kv_heads} KV, vocab {s.padded_vocab} (padded)",
        f"FLOPs/token at seq {i.seq:,}: 6N {f['dense'] / 1e9:.4g} G + attention "
        f"{f['attention'] / 1e9:.4g} G = {f['total'] / 1e9:.4g} GFLOP",
        f"cluster: {c.gpus} GPUs ({c.gpus_per_node}/node), {c.memory_gib:g} GiB each "
        f"({c.reserve_gib:g} reserved), links {c.intra_node_gbps:g}/{c.inter_node_gbps:g} GB/s "
        f"intra/inter, peak {c.peak_flops / 1e12:.1f} TFLOP/s; {i.precision}, global batch "
        f"{i.resolved_global_batch} x {i.seq:,} tokens, micro batch {i.micro_batch}",
    ]
    if i.vision is not None:
        v = i.vision
        lines.append(f"vision tower {i.model.vision.flavor} on the first stage: "
                     f"{_count(v.tower_params)} + projector {_count(v.projector_params)} "
                     f"parameters, {i.resolved_visual_tokens_per_row:,} visual tokens "
                     f"({i.resolved_visual_tokens_per_row * v.merge:,} patches) per row")
    rows = [_row(k + 1, e) for k, e in enumerate(result.ranked[:top])]
    if not rows:
        lines.append(f"no layout fits ({len(result.rejected)} rejected; --json lists why)")
        reasons = sorted({p for e in result.rejected for p in e.problems if "GiB" in p})
        lines += [f"  e.g. {r}" for r in reasons[:3]]
        return "\n".join(lines)
    widths = [max(len(r[k]) for r in [_HEADER, *rows]) for k in range(len(_HEADER))]
    fmt = lambda r: "  ".join(x.rjust(w) if k != 1 else x.ljust(w)  # noqa: E731
                              for k, (x, w) in enumerate(zip(r, widths)))
    lines += ["", fmt(_HEADER), *[fmt(r) for r in rows]]
    lines.append(f"\n{len(result.ranked)} feasible layouts, {len(result.rejected)} rejected "
                 f"(--json lists the reasons); w+g: weights, fp32 main copy, fp32 grads")
    return "\n".join(lines)
