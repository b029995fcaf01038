"""Communication per training step and rank, its time, and the ring-overlap check of CP.

Volumes are bytes sent per rank per optimizer step (ring collectives: an all-reduce moves
2(g-1)/g of the tensor, an all-gather or reduce-scatter (g-1)/g; SP's AG+RS pair moves what one
all-reduce does). Times divide by the group's link bandwidth (`layout.group_bandwidth`: TP in a
node, then CP, DP, PP outward). What overlaps with compute:

- TP: nothing (no userbuffer overlap assumed): 2 collectives per layer forward (attention and
  MLP), 2 backward, 2 more for the re-run forward under full recompute.
- CP p2p ring: per layer, (CP-1) K/V chunk sends forward and twice that backward (K/V and
  dK/dV), overlapped with the chunk-pair attention; only the excess of transfer over compute
  is exposed (`RingCheck`). CP a2a (Ulysses): 4 all-to-alls (q, k, v, out) forward and 4
  backward, exposed.
- DP·CP (ZeRO-1 group): fp32 gradient reduce-scatter + parameter all-gather once per step;
  `dp_overlap` of it hides behind the backward/forward passes (megatron's
  overlap_grad_reduce/overlap_param_gather).
- PP: one activation send and one gradient send per micro-batch and stage boundary, exposed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_keye.planning.layout import Cluster, Layout, group_bandwidth
from megatron_keye.planning.shapes import ModelShape

GB = 1e9

# Fraction of the backward's FLOPs and bytes relative to the forward pass for one ring step:
# the backward moves K/V and dK/dV (2×) for about 2.5× the forward attention FLOPs.
BACKWARD_RING_BYTES = 2.0
BACKWARD_RING_FLOPS = 2.5


@dataclass(kw_only=True)
class RingCheck:
    """One forward ring step: chunk-pair attention compute vs the K/V chunk transfer."""

    chunk_tokens: int  # C = S/CP tokens per rank (two zig-zag halves)
    kv_bytes: float  # one K/V chunk on this TP rank
    compute_s: float  # 2·C²·heads·head_dim·b / TP FLOPs (half the C×C block, zig-zag)
    transfer_s: float
    ok: bool  # transfer <= compute (forward; the backward has slightly more margin)

    @property
    def margin(self) -> float:
        return self.compute_s / self.transfer_s if self.transfer_s else float("inf")


@dataclass(kw_only=True)
class CommEstimate:
    """Bytes per rank per step and exposed seconds per group."""

    tp_bytes: float = 0.0
    cp_bytes: float = 0.0
    dp_bytes: float = 0.0
    pp_bytes: float = 0.0
    tp_s: float = 0.0
    cp_s: float = 0.0  # exposed (p2p: only the transfer in excess of the ring compute)
    dp_s: float = 0.0  # exposed part
    pp_s: float = 0.0
    ring: RingCheck | None = None

    @property
    def exposed_s(self) -> float:
        return self.tp_s + self.cp_s + self.dp_s + self.pp_s

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.ring is not None:
            out["ring"]["margin"] = self.ring.margin
        return out


def estimate_comm(shape: ModelShape, layout: Layout, cluster: Cluster, *, seq: int,
                  num_microbatches: int, stage_params: float, precision: str,
                  attention_flops_rate: float, dp_overlap: float) -> CommEstimate:
    """Communication of one optimizer step on one rank (of the heaviest stage)."""
    act = 4 if precision == "fp32" else 2
    b, m = layout.micro_batch, num_microbatches
    local_tokens = b * seq / layout.cp
    layers = shape.layers / layout.pp
    est = CommEstimate()
    hidden_bytes = local_tokens * shape.hidden * act
    passes = 3 if layout.recompute == "full" else 2  # forward, backward (+ re-run forward)

    if layout.tp > 1:
        t = layout.tp
        est.tp_bytes = m * layers * 2 * passes * 2 * (t - 1) / t * hidden_bytes
        est.tp_s = est.tp_bytes / (group_bandwidth(layout, cluster, "tp") * GB)

    if layout.cp > 1:
        c, bw = layout.cp, group_bandwidth(layout, cluster, "cp") * GB
        d = shape.head_dim
        if layout.cp_comm == "p2p":
            kv_chunk = local_tokens * 2 * shape.kv_heads * d / layout.tp * act
            fwd_passes = 2 if layout.recompute == "full" else 1
            sends = (c - 1) * (fwd_passes + BACKWARD_RING_BYTES)
            est.cp_bytes = m * layers * sends * kv_chunk
            chunk = seq // c
            flops = 2.0 * chunk * chunk * shape.heads * d * b / layout.tp
            compute, transfer = flops / attention_flops_rate, kv_chunk / bw
            est.ring = RingCheck(chunk_tokens=chunk, kv_bytes=kv_chunk, compute_s=compute,
                                 transfer_s=transfer, ok=transfer <= compute)
            exposed_step = (fwd_passes * max(0.0, transfer - compute)
                            + max(0.0, BACKWARD_RING_BYTES * transfer
                                  - BACKWARD_RING_FLOPS * compute))
            est.cp_s = m * layers * (c - 1) * exposed_step
        else:
            width = (2 * shape.heads + 2 * shape.kv_heads) * d / layout.tp
            per_pass = local_tokens * width * act * (c - 1) / c
            est.cp_bytes = m * layers * passes * per_pass
            est.cp_s = est.cp_bytes / bw

    group = layout.dp * layout.cp
    if group > 1:
        frac = (group - 1) / group
        est.dp_bytes = stage_params * (4 + act) * frac  # fp32 grad RS + param AG
        est.dp_s = (1.0 - dp_overlap) * est.dp_bytes / (group_bandwidth(layout, cluster, "dp") * GB)

    if layout.pp > 1:
        boundary = hidden_bytes / (layout.tp if layout.sequence_parallel else 1)
        est.pp_bytes = 2 * m * boundary * layout.vpp
        est.pp_s = est.pp_bytes / (group_bandwidth(layout, cluster, "pp") * GB)
    return est
