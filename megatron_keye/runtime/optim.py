"""Gradients and updates: freezing, megatron-core DDP, the distributed optimizer, the schedule.

The optimizer step is split into megatron-core's public phases so a non-finite loss or gradient
norm skips the update *before* anything is applied (megatron's own fp32 step would apply NaN or
zeroed gradients and corrupt the weights).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import clip_grads, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from megatron_keye.config.schema import (
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
)
from megatron_keye.models.keye_vl.builder import named_parameters_global
from megatron_keye.runtime.mcore_fallback import optimizer_parts

log = logging.getLogger(__name__)


def freeze_parameters(chunks: list[torch.nn.Module], patterns: list[str]) -> int:
    """Freeze every parameter whose global name matches a pattern; returns how many tensors froze.

    Patterns are fnmatch patterns over the full model's names, with global layer numbers
    (`decoder.layers.1.*` is the model's second layer on whichever pipeline stage and virtual
    chunk holds it; `embedding.*`, `*.layer_norm_weight`), so a pattern means the same
    parameters under every PP/VPP layout. Call after the parallel state is initialized.
    """
    frozen = 0
    for chunk in chunks:
        for name, param in named_parameters_global(chunk).items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                param.requires_grad_(False)
                frozen += 1
    return frozen


def wrap_with_ddp(
    chunks: list[torch.nn.Module], config: TransformerConfig, parallel: ParallelConfig
) -> list[DistributedDataParallel]:
    """megatron-core DDP around each model chunk (fp32 gradient buffers, bucketed reduction)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.distributed_optimizer,
        bucket_size=parallel.ddp_bucket_size,
        average_in_collective=False,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk's buckets are reduced eagerly under interleaving.
                disable_bucketing=index > 0,
            )
        )
    return wrapped


def build_optimizer(
    chunks: list[DistributedDataParallel],
    optimizer: OptimizerConfig,
    parallel: ParallelConfig,
    *,
    precision: str,
):
    """AdamW via megatron-core; ZeRO-1 when `parallel.distributed_optimizer`."""
    config = McoreOptimizerConfig(
        optimizer="adam",
        lr=optimizer.lr,
        min_lr=optimizer.min_lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.beta1,
        adam_beta2=optimizer.beta2,
        adam_eps=optimizer.eps,
        clip_grad=optimizer.clip_grad,
        use_distributed_optimizer=parallel.distributed_optimizer,
        bf16=precision == "bf16",
        fp16=False,
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
    )
    megatron_optimizer = get_megatron_optimizer(config, chunks)
    _use_fused_torch_adamw(megatron_optimizer)
    return megatron_optimizer


def _use_fused_torch_adamw(megatron_optimizer) -> None:
    """Run megatron-core's torch-AdamW fallback on torch's fused (single-pass) kernel.

    Without TransformerEngine/apex megatron-core builds a plain `torch.optim.AdamW`, whose default
    on CPU is a per-tensor loop of several elementwise passes. The fused kernel computes the same
    update in one pass (checked against plain AdamW by the ZeRO-1 parity test).
    """
    parts = optimizer_parts(megatron_optimizer)
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.AdamW):
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params):
            inner.defaults.update(fused=True, foreach=False)
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def build_scheduler(
    megatron_optimizer, optimizer: OptimizerConfig, schedule: ScheduleConfig
) -> OptimizerParamScheduler:
    """Warmup then cosine/linear/constant/WSD decay, stepped once per iteration.

    Warmup rises linearly from lr/(warmup+1) so the very first update is not wasted at lr 0
    (megatron's default starts at 0). The scheduler also applies weight decay per group
    (`wd_mult`), so norms and biases are never decayed.
    """
    decay_steps = max(schedule.train_iters, schedule.warmup_iters + 1)
    return OptimizerParamScheduler(
        megatron_optimizer,
        init_lr=optimizer.lr / (schedule.warmup_iters + 1),
        max_lr=optimizer.lr,
        min_lr=optimizer.min_lr,
        lr_warmup_steps=schedule.warmup_iters,
        lr_decay_steps=decay_steps,
        lr_decay_style="WSD" if schedule.decay_style == "wsd" else schedule.decay_style,
        start_wd=optimizer.weight_decay,
        end_wd=optimizer.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=schedule.wsd_decay_iters if schedule.decay_style == "wsd" else None,
        lr_wsd_decay_style=schedule.wsd_decay_style if schedule.decay_style == "wsd" else None,
    )


@dataclass(frozen=True)
class StepOutcome:
    """What the optimizer did this iteration."""

    applied: bool
    grad_norm: float


@torch.no_grad()
def guarded_step(megatron_optimizer, *, loss_is_finite: bool) -> StepOutcome:
    """Apply the update only if the loss and the global gradient norm are finite.

    Mirrors megatron-core's ChainedOptimizer.step (prepare → norm → clip → step) with the
    finiteness check between norm and clip. Every rank reaches the same decision: the norm is
    reduced over all model- and data-parallel ranks, and `loss_is_finite` must already be agreed.
    """
    parts = optimizer_parts(megatron_optimizer)
    found_inf = megatron_optimizer.prepare_grads()
    grad_norm = float(megatron_optimizer.get_grad_norm())
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return StepOutcome(applied=False, grad_norm=grad_norm)
    for part in parts:
        params = part.get_parameters()
        if params and part.config.clip_grad > 0.0:
            clip_grads.clip_grad_by_total_norm_fp32(
                params, max_norm=part.config.clip_grad, total_norm=grad_norm
            )
    applied = megatron_optimizer.step_with_ready_grads()
    return StepOutcome(applied=bool(applied), grad_norm=grad_norm)


def optimizer_state_bytes(megatron_optimizer) -> int:
    """Bytes of Adam moments and fp32 master weights held by this rank (ZeRO-1 shards them)."""
    parts = optimizer_parts(megatron_optimizer)
    total = 0
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    total += value.numel() * value.element_size()
        for group in getattr(part, "shard_fp32_from_float16_groups", []) or []:
            total += sum(p.numel() * p.element_size() for p in group)
    return total
