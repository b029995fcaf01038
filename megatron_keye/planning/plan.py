"""Rank the feasible layouts of a model on a cluster by estimated step time.

Step time = (compute + exposed TP/CP/PP communication) × (1 + pipeline bubble) + exposed
DP·CP communication, with the bubble (PP-1)/(m·VPP) of 1F1B over m micro-batches. Compute is
the model FLOPs of a rank (6N + attention, `runtime.metrics.flops_per_token`) plus what the
recompute mode re-runs (full: the forward again, a third of both terms; selective: the core
attention forward, a third of the attention term), at `gemm_efficiency` × peak for the dense
part and `attention_efficiency` × peak for the attention part. The defaults are assumptions,
not measurements: 0.60 is what large bf16 GEMMs of an 8B model sustain on H100 inside a
training step, 0.45 what flash-attention forward+backward sustains (FA2-class kernels); MFU
counts only the model FLOPs (no recompute), against the datasheet peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_keye.config.schema import ModelConfig
from megatron_keye.planning.comm import CommEstimate, estimate_comm
from megatron_keye.planning.layout import Cluster, Layout, candidate_layouts, layout_problems
from megatron_keye.planning.memory import GIB, MemoryBreakdown, predict_memory, stage_params
from megatron_keye.planning.shapes import ModelShape, model_flops_per_token
from megatron_keye.planning.vision import VisionShape, default_visual_tokens_per_row

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(kw_only=True)
class PlanInputs:
    """What the planner is asked: a model, a sequence length, a cluster and a batch."""

    model: ModelConfig
    seq: int
    cluster: Cluster
    micro_batch: int = 1
    global_batch: int | None = None  # sequences per step; None: about 4M tokens (≥ 1 per GPU)
    precision: str = "bf16"
    recompute: str = "auto"  # none | selective | full | auto (try all three)
    cp_comm: str = "auto"  # p2p | a2a | auto (try both)
    vpp: int = 1
    gemm_efficiency: float = 0.60
    attention_efficiency: float = 0.45
    dp_overlap: float = 0.8
    # Keye-VL (model.vision set): visual LLM tokens per packed row; None: the conservative
    # default of vision.default_visual_tokens_per_row from the two budgets below.
    visual_tokens_per_row: int | None = None
    image_max_tokens: int = 20480  # as data.image_max_tokens
    video_max_tokens: int = 65536  # as data.video_max_tokens

    @property
    def vision(self) -> VisionShape | None:
        """The vision tower's shape on the first stage (None for a text-only model)."""
        vision = self.model.vision
        return None if vision is None else VisionShape.of(vision, self.model.hidden_size)

    @property
    def resolved_visual_tokens_per_row(self) -> int:
        """Visual tokens per row: as given, else the conservative default (0 without vision)."""
        if self.model.vision is None:
            return 0
        if self.visual_tokens_per_row is not None:
            return self.visual_tokens_per_row
        return default_visual_tokens_per_row(seq=self.seq, image_max_tokens=self.image_max_tokens,
                                             video_max_tokens=self.video_max_tokens)

    @property
    def resolved_global_batch(self) -> int:
        if self.global_batch:
            return self.global_batch
        return max(4 * 2**20 // self.seq, 1)


@dataclass(kw_only=True)
class LayoutEstimate:
    """One layout's memory, communication and time (problems empty when it is feasible)."""

    layout: Layout
    problems: list[str]
    memory: MemoryBreakdown | None = None
    comm: CommEstimate | None = None
    num_microbatches: int = 0
    compute_s: float = 0.0
    bubble: float = 0.0
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def overlap_ok(self) -> bool | None:
        """Ring overlap condition (None where no ring is used)."""
        return None if self.comm is None or self.comm.ring is None else self.comm.ring.ok

    def to_dict(self) -> dict:
        out = {"layout": self.layout.to_dict(), "problems": self.problems,
               "feasible": self.feasible}
        if self.memory is not None:
            out.update(
                memory_gib=self.memory.to_dict(),
                comm=self.comm.to_dict(),
                num_microbatches=self.num_microbatches,
                compute_s=self.compute_s,
                bubble=self.bubble,
                step_s=self.step_s,
                tokens_per_s=self.tokens_per_s,
                tokens_per_s_per_gpu=self.tokens_per_s / self.layout.world,
                mfu=self.mfu,
                overlap_ok=self.overlap_ok,
            )
        return out


@dataclass(kw_only=True)
class PlanResult:
    """Ranked feasible layouts and the rejected ones with their reasons."""

    inputs: PlanInputs
    shape: ModelShape
    flops_per_token: dict[str, float]
    ranked: list[LayoutEstimate] = field(default_factory=list)
    rejected: list[LayoutEstimate] = field(default_factory=list)

    @property
    def best(self) -> LayoutEstimate | None:
        return self.ranked[0] if self.ranked else None


def evaluate(inputs: PlanInputs, layout: Layout, shape: ModelShape | None = None) -> LayoutEstimate:
    """Memory, communication and step time of one layout (problems say why it cannot run)."""
    shape = shape or ModelShape.of(inputs.model)
    c = inputs.cluster
    gbs = inputs.resolved_global_batch
    problems = layout_problems(layout, shape, seq=inputs.seq, global_batch=gbs, cluster=c)
    est = LayoutEstimate(layout=layout, problems=problems)
    if problems:
        return est
    m = gbs // (layout.micro_batch * layout.dp)
    est.num_microbatches = m
    est.memory = predict_memory(shape, layout, seq=inputs.seq, precision=inputs.precision,
                                num_microbatches=m, vision=inputs.vision,
                                visual_tokens_per_row=inputs.resolved_visual_tokens_per_row)
    usable = (c.memory_gib - c.reserve_gib) * GIB
    if est.memory.total > usable:
        problems.append(f"needs {est.memory.total / GIB:.1f} GiB per rank > "
                        f"{usable / GIB:.1f} GiB usable ({c.memory_gib:g} - {c.reserve_gib:g} "
                        f"reserved)")
    flops = model_flops_per_token(inputs.model, inputs.seq)
    tokens_per_rank = gbs * inputs.seq / c.gpus
    extra_dense = flops["dense"] / 3 if layout.recompute == "full" else 0.0
    extra_attn = flops["attention"] / 3 if layout.recompute in ("full", "selective") else 0.0
    gemm_rate = c.peak_flops * inputs.gemm_efficiency
    attn_rate = c.peak_flops * inputs.attention_efficiency
    est.compute_s = tokens_per_rank * ((flops["dense"] + extra_dense) / gemm_rate
                                       + (flops["attention"] + extra_attn) / attn_rate)
    heaviest = est.memory.stage
    est.comm = estimate_comm(shape, layout, c, seq=inputs.seq, num_microbatches=m,
                             stage_params=stage_params(shape, layout, heaviest),
                             precision=inputs.precision, attention_flops_rate=attn_rate,
                             dp_overlap=inputs.dp_overlap)
    cm = est.comm
    est.bubble = (layout.pp - 1) / (m * layout.vpp)
    est.step_s = (est.compute_s + cm.tp_s + cm.cp_s + cm.pp_s) * (1 + est.bubble) + cm.dp_s
    est.tokens_per_s = gbs * inputs.seq / est.step_s
    est.mfu = tokens_per_rank * flops["total"] / (est.step_s * c.peak_flops)
    return est


def plan(inputs: PlanInputs) -> PlanResult:
    """Every candidate layout evaluated; those that run and fit ranked by step time."""
    shape = ModelShape.of(inputs.model)
    recomputes = RECOMPUTE_MODES if inputs.recompute == "auto" else (inputs.recompute,)
    comms = ("p2p", "a2a") if inputs.cp_comm == "auto" else (inputs.cp_comm,)
    result = PlanResult(inputs=inputs, shape=shape,
                        flops_per_token=model_flops_per_token(inputs.model, inputs.seq))
    for layout in candidate_layouts(shape, cluster=inputs.cluster, micro_batch=inputs.micro_batch,
                                    recomputes=recomputes, cp_comms=comms, vpp=inputs.vpp):
        est = evaluate(inputs, layout, shape)
        (result.ranked if est.feasible else result.rejected).append(est)
    result.ranked.sort(key=lambda e: (e.step_s, e.memory.total))
    return result
