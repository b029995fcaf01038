"""`megatron-keye launch`: check recipes against a slurm allocation before anything is queued.

    megatron-keye launch --dry-run --recipe keye8b-stage3 --nodes 8 --gpus-per-node 8
    megatron-keye launch --recipe keye8b-stage1 --recipe keye8b-stage2 --nodes 8 --gpus-per-node 8

For each recipe: the config is validated for nodes x GPUs ranks (config/validation.py: the
same refusal, naming the field, that the job would hit after waiting in the queue), then the
planner (megatron_keye/planning) estimates this exact layout's per-GPU memory, step time and
MFU. A layout that does not fit the GPU memory is refused with the planner's reason. Without
`--dry-run` the checks run the same way and the `sbatch` command that starts the run is printed
(`--submit` runs it).

Two additions to the planner's language-model estimate, both on the first pipeline stage:
the vision tower and projector's weights, gradients and Adam state and their saved activations
(planning/vision.py: the conservative default of visual tokens per row from
`data.image_max_tokens`/`data.video_max_tokens`), and frozen parameters (`stage.freeze`), which
keep their weights but no gradient, fp32 main copy or Adam state.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace

from megatron_keye.config import ConfigError, load_config, validate
from megatron_keye.config.schema import TrainConfig, VisionConfig
from megatron_keye.config.validation import data_parallel_size
from megatron_keye.planning import Cluster, Layout, PlanInputs, evaluate
from megatron_keye.planning.memory import (
    GIB,
    MemoryBreakdown,
    in_flight_microbatches,
    predict_memory,
)
from megatron_keye.planning.shapes import ModelShape
from megatron_keye.planning.vision import (
    VisionShape,
    busiest_rank_patches,
    default_visual_tokens_per_row,
    vision_activation_bytes,
    vision_recompute_bytes,
)

SLURM_DIR = "examples/slurm"


def vision_parameter_counts(vision: VisionConfig, lm_hidden: int) -> tuple[int, int]:
    """Elements of the vision tower and of the projector (spec sections 1.1 and 1.2)."""
    shape = VisionShape.of(vision, lm_hidden)
    return shape.tower_params, shape.projector_params


def _frozen(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(kw_only=True)
class RecipeEstimate:
    """A recipe's layout on an allocation and the planner's verdict."""

    recipe: str
    config: TrainConfig
    nodes: int
    gpus_per_node: int
    layout: Layout
    memory: MemoryBreakdown  # heaviest stage, frozen parameters and vision tower included
    vision_bytes: float
    usable_gib: float
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    problems: list[str]

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "layout": self.layout.to_dict(), "memory_gib": self.memory.to_dict(),
                "vision_gib": self.vision_bytes / GIB, "usable_gib": self.usable_gib,
                "step_s": self.step_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "mfu": self.mfu, "feasible": self.feasible, "problems": self.problems}


def recipe_layout(config: TrainConfig, world_size: int) -> Layout:
    """The planner's `Layout` for a config at a world size (validated beforehand)."""
    p = config.parallel
    return Layout(tp=p.tensor, cp=p.context, pp=p.pipeline,
                  dp=data_parallel_size(p, world_size), vpp=p.virtual_pipeline,
                  sequence_parallel=p.sequence_parallel and p.tensor > 1,
                  # the planner models the ring and Ulysses; a2a+p2p and allgather are
                  # estimated as the ring (their K/V buffers are at least as large)
                  cp_comm="a2a" if p.cp_comm == "a2a" else "p2p",
                  recompute=config.model.recompute, micro_batch=config.schedule.micro_batch_size)


def _stage_memory(config: TrainConfig, shape: ModelShape, layout: Layout, *, stage: str,
                  num_microbatches: int, visual_tokens_per_row: int
                  ) -> tuple[MemoryBreakdown, float]:
    """One pipeline stage's memory with frozen parameters and the vision tower accounted."""
    mem = predict_memory(shape, layout, seq=config.data.seq_length, precision=config.precision,
                         num_microbatches=num_microbatches, stage=stage,
                         zero_stage=config.parallel.zero_stage)
    patterns = config.stage.freeze
    act = 2 if config.precision == "bf16" else 4
    shards = layout.dp * layout.cp if config.parallel.distributed_optimizer else 1
    if not config.parallel.distributed_optimizer:  # the planner assumes ZeRO-1
        mem = replace(mem, optimizer=mem.optimizer * layout.dp * layout.cp,
                      main_params=mem.main_params * layout.dp * layout.cp)
    # Trainable share of this stage's language-model parameters.
    per_stage = shape.layers // layout.pp
    first = 0 if stage in ("only", "first") else shape.layers - per_stage
    layer_elems = shape.layer / layout.tp + shape.layer_norms
    total = trainable = 0.0
    for i in range(first, first + per_stage):
        total += layer_elems
        if not _frozen(f"decoder.layers.{i}.self_attention.linear_qkv.weight", patterns):
            trainable += layer_elems
    if stage in ("only", "first"):
        total += shape.embedding / layout.tp
        if not _frozen("embedding.word_embeddings.weight", patterns):
            trainable += shape.embedding / layout.tp
    if stage in ("only", "last") and not (shape.tied and stage == "only"):
        total += shape.output / layout.tp
        if not _frozen("output_layer.weight", patterns):
            trainable += shape.output / layout.tp
    share = trainable / total if total else 1.0
    mem = replace(mem, grads=mem.grads * share, optimizer=mem.optimizer * share,
                  main_params=mem.main_params * share)
    vision_bytes = 0.0
    vision = config.model.vision
    if vision is not None and stage in ("only", "first"):
        v = VisionShape.of(vision, config.model.hidden_size)
        tp = layout.tp
        for local, name in ((v.tower_sharded / tp + v.tower_replicated,
                             "vision.encoder.layers.0.mlp.linear_fc1.weight"),
                            (v.projector_sharded / tp + v.projector_replicated,
                             "projector.linear_1.weight")):
            vision_bytes += local * act
            if not _frozen(name, patterns):
                vision_bytes += local * 4 + local * 8 / shards
                if config.precision == "bf16":
                    vision_bytes += local * 4 / shards
        patches = busiest_rank_patches(v, layout, visual_tokens_per_row=visual_tokens_per_row)
        held = in_flight_microbatches(layout, num_microbatches) if stage == "first" else 1.0
        vision_bytes += held * vision_activation_bytes(v, layout, patches=patches,
                                                       precision=config.precision)
        vision_bytes += vision_recompute_bytes(v, layout, patches=patches,
                                               precision=config.precision)
    return mem, vision_bytes


def estimate_recipe(recipe: str, overrides: list[str], *, nodes: int, gpus_per_node: int,
                    gpu_memory_gib: float = 80.0, reserve_gib: float | None = None,
                    gpu: str = "H100", visual_tokens_per_row: int | None = None
                    ) -> RecipeEstimate:
    """Validate a recipe for nodes x GPUs and estimate its layout (ConfigError when invalid)."""
    from megatron_keye.runtime.metrics import published_bf16_peak

    config = load_config(recipe, overrides)
    world = nodes * gpus_per_node
    validate(config, world)
    layout = recipe_layout(config, world)
    reserve = 0.05 * gpu_memory_gib if reserve_gib is None else reserve_gib
    cluster = Cluster(gpus=world, gpus_per_node=gpus_per_node, memory_gib=gpu_memory_gib,
                      reserve_gib=reserve, peak_flops=published_bf16_peak(gpu) or 989.4e12)
    data = config.data
    if visual_tokens_per_row is None:
        visual_tokens_per_row = default_visual_tokens_per_row(
            seq=data.seq_length, image_max_tokens=data.image_max_tokens,
            video_max_tokens=data.video_max_tokens)
    inputs = PlanInputs(model=config.model, seq=config.data.seq_length, cluster=cluster,
                        micro_batch=config.schedule.micro_batch_size,
                        global_batch=config.schedule.global_batch_size,
                        precision=config.precision, recompute=config.model.recompute,
                        cp_comm=layout.cp_comm, vpp=layout.vpp,
                        visual_tokens_per_row=visual_tokens_per_row)
    planned = evaluate(inputs, layout)
    usable = gpu_memory_gib - reserve
    problems = [p for p in planned.problems if not p.startswith("needs ")]
    shape = ModelShape.of(config.model)
    stages = ("only",) if layout.pp == 1 else ("first", "last")
    m = planned.num_microbatches or max(
        config.schedule.global_batch_size // (layout.micro_batch * layout.dp), 1)
    options = [_stage_memory(config, shape, layout, stage=s, num_microbatches=m,
                             visual_tokens_per_row=visual_tokens_per_row) for s in stages]
    memory, vision_bytes = max(options, key=lambda mv: mv[0].total + mv[1])
    total = (memory.total + vision_bytes) / GIB
    if total > usable:
        problems.append(f"needs {total:.1f} GiB per GPU > {usable:.1f} GiB usable "
                        f"({gpu_memory_gib:g} - {reserve:g} reserved) on the {memory.stage} "
                        f"pipeline stage; use more GPUs (parallel.context, parallel.pipeline, "
                        f"parallel.tensor), model.recompute=selective|full, or a shorter "
                        f"data.seq_length")
        if vision_bytes:
            problems[-1] += (f" (vision tower + projector: {vision_bytes / GIB:.1f} GiB at "
                             f"{visual_tokens_per_row:,} visual tokens per row; "
                             f"--visual-tokens-per-row sets the count"
                             + ("; model.vision.recompute=full keeps only each ViT layer's "
                                "input" if config.model.vision.recompute == "none" else "")
                             + ")")
    return RecipeEstimate(recipe=recipe, config=config, nodes=nodes, gpus_per_node=gpus_per_node,
                          layout=layout, memory=memory, vision_bytes=vision_bytes,
                          usable_gib=usable, step_s=planned.step_s,
                          tokens_per_s_per_gpu=planned.tokens_per_s / world if world else 0.0,
                          mfu=planned.mfu, problems=problems)


def format_estimate(est: RecipeEstimate) -> str:
    """The dry run's report of one recipe."""
    c, lay, mem = est.config, est.layout, est.memory
    world = est.nodes * est.gpus_per_node
    zero = (f"ZeRO-1 over DP x CP = {lay.dp * lay.cp}" if c.parallel.distributed_optimizer
            else "no ZeRO")
    m = c.schedule.global_batch_size // (lay.micro_batch * lay.dp)
    rows = [
        ("weights", mem.params), ("fp32 main copy", mem.main_params), ("fp32 grads", mem.grads),
        ("Adam state", mem.optimizer), ("activations", mem.activations),
        ("logits + transient", mem.logits + mem.transient),
        ("vision tower + projector", est.vision_bytes),  # weights, grads, Adam, activations
    ]
    lines = [
        f"recipe {est.recipe}: {est.nodes} node(s) x {est.gpus_per_node} GPUs = {world} ranks",
        f"  layout  {lay.name} | {zero} | seq {c.data.seq_length:,} | rope_base "
        f"{c.model.rope_base:g} | {c.precision}",
        f"  batch   {c.schedule.global_batch_size} sequences per step = "
        f"{m} micro-batches of {lay.micro_batch} per DP rank",
        f"  memory per GPU (planner, heaviest pipeline stage: {mem.stage}; frozen parameters "
        f"hold weights only):",
    ]
    lines += [f"    {name:<26}{value / GIB:8.2f} GiB" for name, value in rows if value]
    total = (mem.total + est.vision_bytes) / GIB
    lines.append(f"    {'total':<26}{total:8.2f} GiB of {est.usable_gib:.1f} usable")
    if est.step_s:
        lines.append(f"  speed   step {est.step_s:.2f} s | {est.tokens_per_s_per_gpu:,.0f} "
                     f"tokens/s/GPU | MFU {est.mfu:.1%} (planner: language model)")
    if est.feasible:
        lines.append("  feasible")
    else:
        lines += [f"  refused: {p}" for p in est.problems]
    return "\n".join(lines)


def _expected_gpus(recipe: str, overrides: list[str]) -> str:
    """' (the recipe's layout needs N GPUs)' when its degrees fix the world size."""
    try:
        p = load_config(recipe, overrides).parallel
    except ConfigError:
        return ""
    if p.data <= 0:
        return ""
    world = p.tensor * p.pipeline * p.context * p.data
    return (f" (the recipe's layout TP{p.tensor} x PP{p.pipeline} x CP{p.context} x DP{p.data} "
            f"needs {world} GPUs)")


def sbatch_command(recipes: list[str], overrides: list[str], *, nodes: int,
                   gpus_per_node: int) -> list[str]:
    """The `sbatch` command that runs one recipe (train.sbatch) or several (pipeline.sbatch)."""
    script = "train.sbatch" if len(recipes) == 1 else "pipeline.sbatch"
    command = ["sbatch", f"--nodes={nodes}", f"--gpus-per-node={gpus_per_node}",
               f"{SLURM_DIR}/{script}"]
    return [*command, *recipes, *(f"--{o}" for o in overrides)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-keye launch",
        description="Validate recipes against a slurm allocation and show the planner's "
                    "per-GPU memory estimate; print (or --submit) the sbatch command.",
        epilog="Remaining --section.field=value arguments override every recipe.")
    p.add_argument("--recipe", action="append", required=True,
                   help="a recipe name or YAML path (repeat for a multi-stage pipeline)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--reserve", type=float, default=None,
                   help="GiB per GPU kept for CUDA context and NCCL (default 5%%)")
    p.add_argument("--gpu", default="H100", help="GPU name for the published BF16 peak")
    p.add_argument("--visual-tokens-per-row", type=int, default=None,
                   help="visual LLM tokens per packed row for the vision tower's activations "
                        "(default: 2 items of the larger of data.image_max_tokens and "
                        "data.video_max_tokens, at most data.seq_length)")
    p.add_argument("--dry-run", action="store_true", help="check and print; queue nothing")
    p.add_argument("--submit", action="store_true", help="run the sbatch command when feasible")
    p.add_argument("--json", action="store_true", help="the estimates as JSON")
    return p


def cli_main(argv: list[str]) -> int:
    """`megatron-keye launch ...`: 0 when every recipe fits, 2 when one is refused."""
    args, rest = build_parser().parse_known_args(argv)
    overrides = []
    for item in rest:
        if not (item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]):
            raise ConfigError(item, "unknown argument; overrides look like --section.field=value")
        overrides.append(item[2:])
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes", "nodes and GPUs per node must be >= 1")
    estimates, refused = [], False
    for recipe in args.recipe:
        try:
            est = estimate_recipe(recipe, overrides, nodes=args.nodes,
                                  gpus_per_node=args.gpus_per_node,
                                  gpu_memory_gib=args.gpu_memory, reserve_gib=args.reserve,
                                  gpu=args.gpu, visual_tokens_per_row=args.visual_tokens_per_row)
        except ConfigError as err:
            print(f"recipe {recipe}: refused for {args.nodes} x {args.gpus_per_node} GPUs: {err}"
                  + _expected_gpus(recipe, overrides), file=sys.stderr)
            refused = True
            continue
        estimates.append(est)
        refused |= not est.feasible
        if not args.json:
            print(format_estimate(est), file=sys.stdout if est.feasible else sys.stderr)
    if args.json:
        print(json.dumps([e.to_dict() for e in estimates], indent=1))
    if refused:
        return 2
    command = sbatch_command(args.recipe, overrides, nodes=args.nodes,
                             gpus_per_node=args.gpus_per_node)
    if args.dry_run:
        print("would submit: " + shlex.join(command))
        return 0
    if args.submit:
        return subprocess.call(command)
    print(shlex.join(command))
    return 0


__all__ = ["RecipeEstimate", "cli_main", "estimate_recipe", "format_estimate", "recipe_layout",
           "sbatch_command", "vision_parameter_counts"]
