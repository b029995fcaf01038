"""Per-rank memory of a layout: weights, gradients, ZeRO-1 optimizer state, activations.

Activation model
----------------
Activation memory is the sum over *components*: tensors autograd keeps for the backward pass,
each given as elements per token (per layer, or per model for the embedding/head side), a
storage dtype ("act" = the run's precision, or "fp32") and how it is sharded:

- "tp": split over tensor-parallel ranks (heads or FFN columns) whether or not SP is on;
- "sp": hidden-wide tensors, split over TP only under sequence parallelism;
- every component is split over CP (each CP rank holds S/CP tokens).

The components are what this project's modules save (read off `measure.SavedTensorCounter`
on the tiny flavor: `megatron_keye/ops/norm.py` computes RMSNorm in fp32 and saves its fp32
input copy, rstd and the normalized tensor; the following linear saves the norm output;
`ops/attention` saves the rotated q/k, v (a view of the fused QKV output), the output and the
log-sum-exp; SwiGLU saves the fc1 output; fc2 saves the SwiGLU output). With the fused flash
kernels (GPU flash-attn, and torch's CPU SDPA) no S×S score matrix is kept.

Recompute (megatron's `recompute_granularity`):
- "none": every component;
- "selective": megatron's default `recompute_modules=["core_attn"]`: the core-attention
  internals (rotated q/k, output, lse) are dropped and its inputs (q/k norm outputs) kept;
- "full" (uniform, one layer per checkpoint): each layer keeps only its input (h, act, "sp"),
  and the backward pass of one layer re-materializes that layer's "none" set (a transient).

Pipeline: with 1F1B the first stage holds min(PP, m) micro-batches in flight, interleaving
multiplies that by (1 + (PP-1)/(PP·VPP)) (Korthikanti et al. 2022); the last stage holds one,
plus the final norm and the logits. The fp32 cross-entropy keeps its softmax (s × V/TP × 4 B);
in 16-bit runs the 16-bit logits coexist with that fp32 copy for a moment (a transient).

`CALIBRATION` multiplies each component (default 1.0); a benchmark that measures another
stack (TE's fused norms, say) sets them here. Calibration done on this CPU machine (torch
2.13, one process, `measure.measure_activation_bytes`, bytes saved for backward of one
forward + LM loss, no parallelism; the component list was read off these runs):

    flavor  precision  seq x mb  measured B   predicted B  error
    tiny    fp32       256 x 2   18,115,072   18,110,464   -0.03%
    small   fp32       256 x 1   96,179,456   96,177,152   -0.00%
    small   bf16       256 x 1   57,316,608   56,855,552   -0.80%

tests/unit/test_planner.py repeats the tiny fp32 case (±15%). Not calibrated here: the TP/SP,
CP and PP divisions (single process), which follow Korthikanti et al. and megatron's schedules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_keye.planning.components import Component, component_bytes
from megatron_keye.planning.layout import Layout
from megatron_keye.planning.shapes import ModelShape
from megatron_keye.planning.vision import (
    VisionShape,
    busiest_rank_patches,
    vision_activation_bytes,
    vision_recompute_bytes,
)

GIB = float(2**30)

def _norm(prefix: str, width: int, shard: str, *, out_saved: bool) -> list[Component]:
    """This project's RMSNorm: fp32 input copy, rstd, normalized; the output when a linear
    follows (the linear saves its input)."""
    parts = [Component(name=f"{prefix}_in", elements=width, dtype="fp32", shard=shard),
             Component(name=f"{prefix}_rstd", elements=1, dtype="fp32", shard=shard),
             Component(name=f"{prefix}_normalized", elements=width, dtype="act", shard=shard)]
    if out_saved:
        parts.append(Component(name=f"{prefix}_out", elements=width, dtype="act", shard=shard))
    return parts


def layer_components(s: ModelShape, *, recompute: str, precision: str) -> list[Component]:
    """Saved tensors of one decoder layer per token under a recompute mode."""
    h, d = s.hidden, s.head_dim
    q, kv = s.heads * d, s.kv_heads * d
    if recompute == "full":
        return [Component(name="layer_input", elements=h, dtype="act", shard="sp")]
    comps = [
        *_norm("attn_norm", h, "sp", out_saved=True),
        # q/k RMSNorm over head_dim: fp32 input copy, rstd per head, normalized.
        Component(name="q_norm_in", elements=q, dtype="fp32", shard="tp"),
        Component(name="q_norm_rstd", elements=s.heads, dtype="fp32", shard="tp"),
        Component(name="q_norm_normalized", elements=q, dtype="act", shard="tp"),
        # Fused QKV output: k-norm's input is a view of it in fp32, v is always a view.
        Component(name="qkv_out", elements=q + 2 * kv, dtype="act", shard="tp"),
        Component(name="k_norm_in", elements=kv if precision != "fp32" else 0, dtype="fp32",
                  shard="tp"),
        Component(name="k_norm_rstd", elements=s.kv_heads, dtype="fp32", shard="tp"),
        Component(name="k_norm_normalized", elements=kv, dtype="act", shard="tp"),
    ]
    if recompute == "selective":  # core_attn checkpoint keeps its inputs: the q/k norm outputs
        comps.append(Component(name="core_attn_inputs", elements=q + kv, dtype="act", shard="tp"))
    else:
        comps += [
            Component(name="core_qk_rotated", elements=q + kv, dtype="act", shard="tp"),
            Component(name="core_out", elements=q, dtype="act", shard="tp"),
            Component(name="core_lse", elements=s.heads, dtype="fp32", shard="tp"),
        ]
    comps += [
        Component(name="proj_in", elements=q, dtype="act", shard="tp"),
        *_norm("mlp_norm", h, "sp", out_saved=True),
        Component(name="fc1_out", elements=2 * s.ffn, dtype="act", shard="tp"),
        Component(name="fc2_in", elements=s.ffn, dtype="act", shard="tp"),
    ]
    return comps


def head_components(s: ModelShape) -> list[Component]:
    """Last stage, once per micro-batch: final norm and the fp32 cross-entropy softmax."""
    return [*_norm("final_norm", s.hidden, "sp", out_saved=True),
            Component(name="logits_fp32", elements=s.padded_vocab, dtype="fp32", shard="tp")]


def stage_components(s: ModelShape) -> list[Component]:
    """Every stage: the rotary cos/sin tables; the first stage also its token ids."""
    return [Component(name="rope_tables", elements=s.head_dim, dtype="fp32", shard="none")]


def _sum(comps: list[Component], layout: Layout, *, tokens: float, precision: str) -> float:
    return sum(component_bytes(c, layout, tokens=tokens, precision=precision) for c in comps)


@dataclass(kw_only=True)
class MemoryBreakdown:
    """Bytes per rank on the heaviest pipeline stage (`stage`)."""

    stage: str  # "only" (PP = 1) | "first" | "last"
    params: float  # model weights in the run's precision (ZeRO-3: shards + gathered layers)
    main_params: float  # fp32 master copy (16-bit runs), sharded over DP·CP (ZeRO-1)
    grads: float  # ZeRO-1: fp32 gradient buffers, not sharded; ZeRO-2/3: 1/(DP·CP) shards
    optimizer: float  # Adam m and v (fp32), sharded over DP·CP
    activations: float  # saved for backward, all in-flight micro-batches
    logits: float  # fp32 cross-entropy softmax of one micro-batch (last stage)
    transient: float  # briefly alive: 16-bit logits, full-recompute layer, CP buffers

    @property
    def weights_and_optimizer(self) -> float:
        return self.params + self.main_params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.weights_and_optimizer + self.activations + self.logits + self.transient

    def to_dict(self, unit: float = GIB) -> dict:
        out = {k: (v / unit if isinstance(v, float | int) else v) for k, v in asdict(self).items()}
        out["total"] = self.total / unit
        return out


def in_flight_microbatches(layout: Layout, num_microbatches: int) -> float:
    """Micro-batches whose activations the first stage holds at the peak (1F1B)."""
    if layout.pp == 1:
        return 1.0
    held = float(min(layout.pp, num_microbatches))
    if layout.vpp > 1:
        held *= 1.0 + (layout.pp - 1) / (layout.pp * layout.vpp)
    return held


def stage_params(s: ModelShape, layout: Layout, stage: str) -> float:
    """Parameter elements on one rank of a stage (TP-sharded matrices, replicated norms)."""
    layers = s.layers / layout.pp
    n = layers * (s.layer / layout.tp + s.layer_norms)
    if stage in ("only", "first"):
        n += s.embedding / layout.tp
    if stage in ("only", "last"):
        n += s.final_norm
        if not (s.tied and stage == "only"):
            n += s.output / layout.tp
    return n


def predict_memory(shape: ModelShape, layout: Layout, *, seq: int, precision: str = "bf16",
                   num_microbatches: int = 1, stage: str | None = None,
                   zero_stage: int = 1, vision: VisionShape | None = None,
                   visual_tokens_per_row: float = 0.0) -> MemoryBreakdown:
    """Predicted memory per rank of `stage` ("only" | "first" | "last"; None = the heaviest).

    `layout.micro_batch` sequences of `seq` tokens per micro-batch; ZeRO over DP·CP at
    `zero_stage` (`parallel.zero_stage`): 1 shards the optimizer state; 2 (torch FSDP2) also
    the gradients, held in fp32, with every layer's gathered parameters alive from forward to
    backward; 3 also the parameters, plus two gathered layers in flight (under bf16 the stored
    fp32 shards are the master weights, counted once, as `main_params`).
    With `vision` (a Keye-VL model) the first stage also holds the vision tower and projector:
    their parameters (trained like the decoder's) and the saved activations of
    `visual_tokens_per_row` visual LLM tokens of every row (`vision.py`).
    """
    if stage is None:
        kw = dict(seq=seq, precision=precision, num_microbatches=num_microbatches,
                  zero_stage=zero_stage, vision=vision,
                  visual_tokens_per_row=visual_tokens_per_row)
        if layout.pp == 1:
            return predict_memory(shape, layout, stage="only", **kw)
        first, last = (predict_memory(shape, layout, stage=x, **kw) for x in ("first", "last"))
        return first if first.total >= last.total else last
    act = 4 if precision == "fp32" else 2
    n = stage_params(shape, layout, stage)
    shards = layout.dp * layout.cp
    tokens = float(layout.micro_batch * seq)
    layers = shape.layers / layout.pp
    per_mb = layers * _sum(layer_components(shape, recompute=layout.recompute,
                                            precision=precision),
                           layout, tokens=tokens, precision=precision)
    per_mb += _sum(stage_components(shape), layout, tokens=tokens, precision=precision)
    if vision is not None and stage in ("only", "first"):
        n += vision.rank_params(layout.tp)
        patches = busiest_rank_patches(vision, layout, visual_tokens_per_row=visual_tokens_per_row)
        per_mb += vision_activation_bytes(vision, layout, patches=patches, precision=precision)
    held = in_flight_microbatches(layout, num_microbatches) if stage == "first" else 1.0
    logits = transient = 0.0
    if stage in ("only", "last"):
        head = head_components(shape)
        per_mb_head = _sum(head[:-1], layout, tokens=tokens, precision=precision)
        per_mb += per_mb_head
        logits = _sum(head[-1:], layout, tokens=tokens, precision=precision)
        if precision != "fp32":  # the 16-bit logits beside their fp32 copy
            transient += logits * act / 4
    if vision is not None and stage in ("only", "first"):  # vision.recompute=full: one ViT layer
        transient += vision_recompute_bytes(vision, layout, patches=patches, precision=precision)
    if layout.recompute == "full":  # one layer re-materialized in the backward pass
        transient += _sum(layer_components(shape, recompute="none", precision=precision),
                          layout, tokens=tokens, precision=precision)
    if layout.cp > 1:  # ring: K/V receive + send buffers; a2a: the exchanged q/k/v/out
        kv = 2 * shape.kv_heads * shape.head_dim
        width = 2 * kv if layout.cp_comm == "p2p" else 2 * shape.heads * shape.head_dim + kv
        transient += width * act * tokens / (layout.cp * layout.tp)
    params, grads = n * act, n * 4.0
    if zero_stage >= 2:  # fp32 gradient shards (FSDP2 reduces and accumulates in fp32)
        grads = n * 4.0 / shards
    if zero_stage >= 3:  # shards at rest, two layers (this one and the prefetched) gathered;
        # under 16-bit precision the fp32 shards are the master weights (`main_params`)
        params = (n * 4.0 / shards if precision == "fp32" else 0.0) \
            + 2 * (shape.layer / layout.tp + shape.layer_norms) * act
    return MemoryBreakdown(
        stage=stage,
        params=params,
        main_params=(n * 4 / shards) if precision != "fp32" else 0.0,
        grads=grads,
        optimizer=n * 8 / shards,
        activations=per_mb * held,
        logits=logits,
        transient=transient,
    )


def predicted_activation_bytes(shape: ModelShape, *, seq: int, micro_batch: int,
                               precision: str = "fp32", recompute: str = "none", tp: int = 1,
                               sequence_parallel: bool = False, pp: int = 1,
                               stage: str = "only") -> float:
    """Saved-for-backward bytes of one forward + loss of one micro-batch on one rank of a
    TP x PP layout's `stage` ("only" without PP, else "first" | "last"): what
    `measure.measure_activation_bytes` measures on that rank."""
    layout = Layout(tp=tp, cp=1, pp=pp, dp=1, sequence_parallel=sequence_parallel,
                    recompute=recompute, micro_batch=micro_batch)
    m = predict_memory(shape, layout, seq=seq, precision=precision, stage=stage)
    ids = micro_batch * seq * 8 if stage in ("only", "first") else 0  # the embedding's int64 ids
    return m.activations + m.logits + ids
