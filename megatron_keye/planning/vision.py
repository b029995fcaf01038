"""The vision tower and projector in the planner: their parameters and saved activations.

Keye-VL's first pipeline stage runs the SigLIP-style tower and the `mlp_AR` projector
(`models/keye_vl/vision.py`, `projector.py`) on every visual patch of the micro-batch before
its decoder layers, so that stage holds, besides the decoder's, the tower's and projector's
weights, gradients and Adam state, and their saved activations for the micro-batch's patches.

Activations use `memory.Component`s per *patch* (the decoder's are per token), read off
`measure.measure_vision_activation_bytes` on the tiny vision flavor (`by_shape`, fp32, TP 1 and
2, with and without SP): per layer torch's LayerNorm keeps its input, mean and rstd and the
following linear its output; attention keeps the fused QKV output, the rotated q/k, the core
output, its log-sum-exp and the projection's input; the MLP keeps fc1's output and the GELU
output. Once per patch: the patch-embedding input (C·p² pixels), the 2D-RoPE cos/sin tables and
the post-layernorm; the projector keeps, per merged token (merge² patches), its LayerNorm
input/stats/output, linear_1's output, the GELU output and the int64 merge index. The tower
recomputes by its own `vision.recompute` (none | full), not the layout's (decoder) mode. TP/SP sharding is the decoder's rule (`memory.component_bytes`); the projector's
input and output are replicated over TP. Measured (fp32, 448 patches: one 16x16 image and a
2-frame 8x12 video): TP1 4,122,496 B vs 4,122,496 predicted, TP2 3,083,136 vs 3,083,136,
TP2+SP 2,730,112 vs 2,687,104 (-1.6%: one more hidden-wide SP shard than modeled).

With `vision.recompute=full` (megatron-core's full uniform recompute, one layer per
checkpoint) each layer keeps only its input (hidden per patch, SP-sharded) and the backward
pass re-runs one layer at a time, so one layer's full activations are alive briefly on top
(`vision_recompute_bytes`, counted once, not per micro-batch in flight). Measured on the same
tiny case, forward-saved / largest re-run layer: TP1 1,663,872 / 1,326,080 B vs 1,685,376 /
1,304,576 predicted (sum exact: the RoPE tables are saved by the re-run, not the forward),
TP2+SP 1,490,048 / 673,792 vs 1,468,544 / 652,288 (-2.0% in all); the forward saves 40% of
the no-recompute bytes at TP1.

Patches per micro-batch: `visual_tokens_per_row` LLM tokens of each packed row are visual
(merge² = 4 patches each). Its default (`default_visual_tokens_per_row`) is conservative:
`VISUAL_ITEMS_PER_ROW` maximal items (the larger of `data.image_max_tokens` and
`data.video_max_tokens`), capped by the row length. Under context parallelism the CP ranks
split the vision work by whole items (`models/keye_vl/vision_placement.py`), so the busiest
rank encodes patches / min(CP, items in the micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_keye.config.schema import VisionConfig
from megatron_keye.planning.components import Component, component_bytes
from megatron_keye.planning.layout import Layout

# Maximal visual items assumed in one packed row when no visual-token count is given.
VISUAL_ITEMS_PER_ROW = 2


@dataclass(kw_only=True, frozen=True)
class VisionShape:
    """Vision tower + projector shapes and parameter counts (elements).

    `*_sharded` are split over TP ranks (column/row-parallel weights and column-parallel
    biases), `*_replicated` are whole on every TP rank (norms, row-parallel biases, the patch
    embedding and position table).
    """

    hidden: int
    ffn: int
    heads: int
    head_dim: int
    layers: int
    patch_pixels: int  # C·p² values of one patch row
    merge: int  # patches per LLM token (spatial_merge_size²)
    tower_sharded: int
    tower_replicated: int
    projector_sharded: int
    projector_replicated: int
    recompute: str = "none"  # vision.recompute: none | full

    @classmethod
    def of(cls, vision: VisionConfig, lm_hidden: int) -> VisionShape:
        h, f, m = vision.hidden_size, vision.ffn_hidden_size, vision.merged_size
        pixels = vision.num_channels * vision.patch_size**2
        layer_sharded = 3 * h * h + 3 * h + h * h + h * f + f + f * h
        layer_replicated = h + h + 4 * h  # proj and fc2 biases, two LayerNorms
        embeddings = pixels * h + h + vision.position_grid**2 * h
        return cls(
            hidden=h, ffn=f, heads=vision.num_attention_heads, head_dim=vision.head_dim,
            layers=vision.num_layers, patch_pixels=pixels, merge=vision.spatial_merge_size**2,
            tower_sharded=vision.num_layers * layer_sharded,
            tower_replicated=vision.num_layers * layer_replicated + embeddings + 2 * h,
            projector_sharded=m * m + m + m * lm_hidden,
            projector_replicated=2 * m + lm_hidden,
            recompute=vision.recompute,
        )

    @property
    def tower_params(self) -> int:
        return self.tower_sharded + self.tower_replicated

    @property
    def projector_params(self) -> int:
        return self.projector_sharded + self.projector_replicated

    def rank_params(self, tp: int) -> float:
        """Tower + projector elements on one TP rank of the first stage."""
        return (self.tower_sharded + self.projector_sharded) / tp + (
            self.tower_replicated + self.projector_replicated)


def _layer_norm(prefix: str, width: float, shard: str) -> list[Component]:
    """torch LayerNorm followed by a linear: input, fp32 mean and rstd, output."""
    return [Component(name=f"{prefix}_in", elements=width, dtype="act", shard=shard),
            Component(name=f"{prefix}_stats", elements=2, dtype="fp32", shard=shard),
            Component(name=f"{prefix}_out", elements=width, dtype="act", shard=shard)]


def vision_layer_components(v: VisionShape) -> list[Component]:
    """Saved tensors of one ViT layer per patch."""
    h = v.hidden
    return [
        *_layer_norm("vit_ln1", h, "sp"),
        Component(name="vit_qkv_out", elements=3 * h, dtype="act", shard="tp"),
        Component(name="vit_qk_rotated", elements=2 * h, dtype="act", shard="tp"),
        Component(name="vit_core_out", elements=h, dtype="act", shard="tp"),
        Component(name="vit_core_lse", elements=v.heads, dtype="fp32", shard="tp"),
        Component(name="vit_proj_in", elements=h, dtype="act", shard="tp"),
        *_layer_norm("vit_ln2", h, "sp"),
        Component(name="vit_fc1_out", elements=v.ffn, dtype="act", shard="tp"),
        Component(name="vit_fc2_in", elements=v.ffn, dtype="act", shard="tp"),
    ]


def vision_once_components(v: VisionShape) -> list[Component]:
    """Saved once per patch outside the layers: embedding input, RoPE, post-LN, projector."""
    h, per_token = v.hidden, 1.0 / v.merge
    merged = v.merge * v.hidden * per_token  # merged width per token, spread over its patches
    return [
        Component(name="vit_patch_in", elements=v.patch_pixels, dtype="act", shard="none"),
        Component(name="vit_rope_tables", elements=v.head_dim, dtype="fp32", shard="none"),
        Component(name="vit_post_ln_in", elements=h, dtype="act", shard="sp"),
        Component(name="vit_post_ln_stats", elements=2, dtype="fp32", shard="sp"),
        Component(name="proj_merge_index", elements=1, dtype="int64", shard="none"),
        Component(name="proj_ln_in", elements=merged, dtype="act", shard="none"),
        Component(name="proj_ln_stats", elements=2 * per_token, dtype="fp32", shard="none"),
        Component(name="proj_ln_out", elements=merged, dtype="act", shard="none"),
        Component(name="proj_fc1_out", elements=merged, dtype="act", shard="tp"),
        Component(name="proj_fc2_in", elements=merged, dtype="act", shard="tp"),
    ]


def vision_activation_bytes(v: VisionShape, layout: Layout, *, patches: float,
                            precision: str) -> float:
    """Saved-for-backward bytes of the tower + projector for `patches` patches on one rank
    (CP already accounted by the caller: pass the busiest CP rank's patches)."""
    flat = _flat(layout)
    kept = vision_layer_components(v) if v.recompute == "none" else [
        Component(name="vit_layer_in", elements=v.hidden, dtype="act", shard="sp")]
    layer = sum(component_bytes(c, flat, tokens=patches, precision=precision) for c in kept)
    once = sum(component_bytes(c, flat, tokens=patches, precision=precision)
               for c in vision_once_components(v))
    return v.layers * layer + once


def vision_recompute_bytes(v: VisionShape, layout: Layout, *, patches: float,
                           precision: str) -> float:
    """Bytes of the one ViT layer re-run at a time in the backward pass under
    `vision.recompute=full` (its full activations for `patches` patches), 0 without recompute.
    Alive only during that layer's backward, so counted once per rank, not per micro-batch."""
    if v.recompute == "none":
        return 0.0
    return sum(component_bytes(c, _flat(layout), tokens=patches, precision=precision)
               for c in vision_layer_components(v))


def _flat(layout: Layout) -> Layout:
    # component_bytes divides by CP; the vision work is split over CP by whole items instead.
    return Layout(tp=layout.tp, cp=1, pp=1, dp=1, sequence_parallel=layout.sequence_parallel)


def default_visual_tokens_per_row(*, seq: int, image_max_tokens: int,
                                  video_max_tokens: int) -> int:
    """Conservative visual LLM tokens in one packed row: `VISUAL_ITEMS_PER_ROW` maximal items
    (the larger of the image and video budgets), at most the whole row."""
    return min(seq, VISUAL_ITEMS_PER_ROW * max(image_max_tokens, video_max_tokens))


def busiest_rank_patches(v: VisionShape, layout: Layout, *, visual_tokens_per_row: float,
                         items_per_row: float = VISUAL_ITEMS_PER_ROW) -> float:
    """Patches the busiest CP rank encodes in one micro-batch: rows × tokens × merge², split
    over CP by whole items (at most `items_per_row` per row)."""
    patches = layout.micro_batch * visual_tokens_per_row * v.merge
    items = max(layout.micro_batch * items_per_row, 1.0)
    return patches / min(layout.cp, items)
