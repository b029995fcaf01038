"""Gradients and updates: freezing, megatron-core DDP, the distributed optimizer, the schedule.

The optimizer step is split into megatron-core's public phases so a non-finite loss or gradient
norm skips the update *before* anything is applied (megatron's own fp32 step would apply NaN or
zeroed gradients and corrupt the weights).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.torch_fully_sharded_data_parallel import (
    TorchFullyShardedDataParallel,
)
from megatron.core.distributed.torch_fully_sharded_data_parallel_config import (
    TorchFullyShardedDataParallelConfig,
)
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import clip_grads, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

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
) -> list[torch.nn.Module]:
    """Data-parallel wrapper around each model chunk, by `parallel.zero_stage`.

    Stage 1: megatron-core DDP (fp32 gradient buffers, bucketed reduction; with
    `distributed_optimizer` the optimizer shards Adam state = ZeRO-1). Stages 2 and 3:
    `ShardedDataParallel`, megatron-core's torch-FSDP2 wrapper (gradients, parameters at rest
    and so Adam state sharded over data x context ranks).
    """
    if parallel.zero_stage > 1:
        return [
            ShardedDataParallel(config=config, module=chunk, zero_stage=parallel.zero_stage)
            for chunk in chunks
        ]
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


class ShardedDataParallel(TorchFullyShardedDataParallel):
    """ZeRO-2/3 on megatron-core's torch-FSDP2 wrapper, completed for megatron's training step.

    `TorchFullyShardedDataParallel` shards every transformer layer and the embedding (and then
    the root module) with `fully_shard` over the data x context group: each rank keeps 1/DP of
    every parameter and, after FSDP2's reduce-scatter in backward, 1/DP of every gradient, so
    the optimizer (a plain megatron-core optimizer over the DTensor shards) holds 1/DP of the
    Adam state. Stage 2 keeps a layer's gathered parameters from its forward to its backward
    (`reshard_after_forward=False`); stage 3 frees them after forward and gathers again in
    backward. megatron-core's wrapper leaves three methods of the DDP interface empty that the
    step needs; they are filled in here:

    - gradients are summed over data ranks, not averaged (FSDP2's default): the loss is a sum
      that `finalize_model_grads` divides once by the global token count, as under DDP;
    - `scale_gradients` applies that division to the sharded gradients;
    - `finish_grad_sync` accepts `force_all_reduce` (FSDP2 has already reduced in backward).

    Under `precision: bf16` the stored shards are fp32 and FSDP2 computes in bf16 and reduces
    in fp32 (`_mixed_precision`), matching zero_stage 1's bf16 numerics.
    """

    def __init__(self, *, config: TransformerConfig, module: torch.nn.Module, zero_stage: int):
        ddp_config = TorchFullyShardedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=False,
            average_in_collective=False,
            reshard_after_forward=zero_stage >= 3,
        )
        compute_dtype = config.params_dtype
        if compute_dtype != torch.float32:
            # The stored shards are the fp32 master weights (see `_mixed_precision`).
            for param in module.parameters():
                param.data = param.data.float()
        # Each transformer layer (language and vision) and the embedding is one FSDP unit; the
        # root unit holds the rest (norms, output layer, projector). megatron-core's default
        # set also names ColumnParallelLinear, which would shard a layer's linears a second
        # time after their layer (it drops it only for transformer_impl="local").
        with _mixed_precision(compute_dtype):
            super().__init__(
                config=config,
                ddp_config=ddp_config,
                module=module,
                sub_modules_to_wrap={TransformerLayer, LanguageModelEmbedding},
            )
        self.zero_stage = zero_stage
        for sub_module in self.module.modules():
            if isinstance(sub_module, FSDPModule):
                # A plain SUM (no PREMUL_SUM/AVG op, which gloo lacks) then a division by 1.
                sub_module.set_gradient_divide_factor(1.0)
                sub_module.set_force_sum_reduction_for_comms(True)

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """Nothing to wait for: FSDP2 reduce-scatters each layer's gradients in backward."""

    def scale_gradients(self, scaling_factor: float) -> None:
        """Multiply this rank's gradient shards by `scaling_factor` (1 / global token count)."""
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad.mul_(scaling_factor)

    def zero_grad_buffer(self) -> None:
        """Drop the gradients of the previous step (FSDP2 accumulates into `param.grad`)."""
        for param in self.module.parameters():
            param.grad = None

    def load_local_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's local tensors (this rank's DP shard of each) into the shards.

        `dist_checkpointing` reads into the local tensors of the DTensor parameters that the
        model's sharded state dict hands it; anything it returned elsewhere is copied in. (The
        module's own `load_state_dict` would try to assign plain tensors to DTensor parameters.)
        """
        targets = dict(self.module.named_parameters())
        targets.update(self.module.named_buffers())
        wanted = {k for k in self.module.state_dict() if not k.endswith("_extra_state")}
        missing = sorted(wanted - set(state_dict))
        unexpected = sorted(k for k in set(state_dict) - set(targets) if not k.endswith("_extra_state"))
        if missing or unexpected:
            raise KeyError(f"checkpoint state does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name not in targets:
                    continue
                target = targets[name]
                local = target._local_tensor if isinstance(target, DTensor) else target
                if isinstance(value, DTensor):
                    value = value._local_tensor
                elif isinstance(target, DTensor) and tuple(value.shape) == tuple(target.shape):
                    value = _local_rows(value, target)  # a whole (TP-local) tensor
                if local.data_ptr() != value.data_ptr():
                    local.copy_(value.reshape(local.shape))


@contextlib.contextmanager
def _mixed_precision(compute_dtype: torch.dtype):
    """Within the block, megatron-core's `fully_shard` calls get FSDP2's mixed-precision policy.

    Under `precision: bf16` zero_stage 1 keeps bf16 parameters, fp32 master copies in the
    optimizer, and accumulates and reduces gradients in fp32 (`grad_reduce_in_fp32`). FSDP2
    gets the same numerics from its own mixed precision: the stored shards are fp32 (they are
    the master weights the optimizer updates), each layer's gathered copy is cast to bf16 for
    forward and backward (`param_dtype`), and gradients are cast to fp32 before the
    reduce-scatter and accumulated in fp32 shards (`reduce_dtype`). With bf16 shards instead,
    FSDP2 would reduce and accumulate gradients in bf16 and round them once per micro-batch.
    Inputs are not cast (`cast_forward_inputs=False`): zero_stage 1 has no such cast either, and
    FSDP2's would round every float a layer receives to bf16, rotary angles included (position
    x frequency: bf16 keeps 8 bits, so angles at long context would be off by whole radians).
    megatron-core's wrapper passes no policy of its own, hence this scoped substitution. For
    fp32 it is FSDP2's default (no casts).
    """
    from megatron.core.distributed import torch_fully_sharded_data_parallel as mcore_fsdp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    original = mcore_fsdp.fully_shard
    mcore_fsdp.fully_shard = lambda module, **kwargs: fully_shard(module, mp_policy=policy,
                                                                  **kwargs)
    try:
        yield
    finally:
        mcore_fsdp.fully_shard = original


def _local_rows(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's piece of `full` as `like` (a DTensor of full's shape) lays it out.

    FSDP2 shards dim 0 in `torch.chunk` pieces (the last may be short or empty); the DTensor's
    own local shape and global offset say which rows are this rank's.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        like.shape, like.device_mesh, like.placements
    )
    piece = full
    for dim, (size, start) in enumerate(zip(shape, offset, strict=True)):
        piece = piece.narrow(dim, start, size)
    return piece


@contextlib.contextmanager
def whole_parameters(chunk):
    """Within the block, `chunk`'s DTensor parameters are whole (TP-local) plain parameters.

    For checkpoints of zero_stage 2/3: megatron-core's `sharded_state_dict` then sees exactly
    what it sees at zero_stage 1 (whole tensor-parallel pieces, so its gated-MLP `linear_fc1`
    gate/up split and its TP offsets are right), and the checkpoint is the same, fully
    reshardable format as zero_stage 1's. Each DTensor is all-gathered over its data-parallel
    mesh (collective: every rank of the chunk must enter), so one whole copy of the chunk's
    parameters is held while the block runs. The DTensors are put back on exit; the whole
    tensors stay valid (a checkpoint's sharded state dict keeps referring to them). For a chunk
    without DTensor parameters this does nothing.
    """
    swapped, wholes = [], {}
    with torch.no_grad():
        for module in chunk.modules():
            for name, param in list(module._parameters.items()):
                if not isinstance(param, DTensor):
                    continue
                whole = wholes.get(id(param))  # a parameter shared by two modules: one copy
                if whole is None:
                    whole = torch.nn.Parameter(param.full_tensor(),
                                               requires_grad=param.requires_grad)
                    for attr, value in vars(param).items():  # megatron's TP attributes
                        if not attr.startswith("_"):
                            setattr(whole, attr, value)
                    wholes[id(param)] = whole
                module._parameters[name] = whole
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def optimizer_sharded_state_dict(megatron_optimizer, model_sharded_state: dict, **kwargs):
    """`megatron_optimizer.sharded_state_dict(model_sharded_state, **kwargs)`, FSDP2-aware.

    megatron-core maps optimizer parameters to the model's sharded tensors by object identity
    (dist_checkpointing/optimizer.py `get_optim_param_to_id_map`), comparing
    `DTensor.to_local()` with the `_local_tensor` the model's sharded state dict holds; under
    torch 2.13 `to_local()` returns a new alias on every call, so no parameter of a zero_stage
    2/3 model matches. For the duration of the call the map is keyed by `_local_tensor`.
    Without DTensor parameters this is the plain call.
    """
    from megatron.core.dist_checkpointing import optimizer as dist_optimizer

    original = dist_optimizer.get_optim_param_to_id_map

    def by_local_tensor(params):
        mapping = {}
        for index, param in enumerate(params):
            local = param._local_tensor if isinstance(param, DTensor) else param
            mapping.setdefault(id(local), index)
        return mapping

    dist_optimizer.get_optim_param_to_id_map = by_local_tensor
    try:
        return megatron_optimizer.sharded_state_dict(model_sharded_state, **kwargs)
    finally:
        dist_optimizer.get_optim_param_to_id_map = original

@torch.no_grad()
def restore_dtensor_optimizer_state(megatron_optimizer) -> int:
    """Turn loaded Adam moments of DTensor parameters back into DTensors; returns how many.

    A checkpoint hands torch's `Optimizer.load_state_dict` each moment as this rank's local
    shard (a plain tensor), which it stores as is; the fused AdamW then refuses to mix them with
    the DTensor parameters of zero_stage 2/3. Each becomes a DTensor laid out like its
    parameter. A no-op for plain parameters.
    """
    restored = 0
    for part in optimizer_parts(megatron_optimizer):
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not isinstance(param, DTensor):
                    continue
                state = inner.state.get(param, {})
                for key, value in state.items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.dim():
                        state[key] = DTensor.from_local(
                            value.reshape(param._local_tensor.shape),
                            param.device_mesh,
                            param.placements,
                            shape=param.shape,
                            stride=param.stride(),
                        )
                        restored += 1
    return restored


def build_optimizer(
    chunks: list[DistributedDataParallel],
    optimizer: OptimizerConfig,
    parallel: ParallelConfig,
    *,
    precision: str,
):
    """AdamW via megatron-core; ZeRO-1 when `parallel.distributed_optimizer` at zero_stage 1.

    At zero_stage 2/3 the parameters are already DP shards (FSDP2 DTensors, fp32 under bf16
    too: `ShardedDataParallel`), so megatron-core's plain fp32 optimizer over them holds 1/DP of
    the state and of the master weights without the distributed optimizer.
    """
    config = McoreOptimizerConfig(
        optimizer="adam",
        lr=optimizer.lr,
        min_lr=optimizer.min_lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.beta1,
        adam_beta2=optimizer.beta2,
        adam_eps=optimizer.eps,
        clip_grad=optimizer.clip_grad,
        use_distributed_optimizer=parallel.distributed_optimizer and parallel.zero_stage == 1,
        # zero_stage 2/3 store fp32 shards, FSDP2 casts them to bf16 for compute: those shards
        # are the master weights, so the optimizer is megatron's plain fp32 one over them.
        bf16=precision == "bf16" and parallel.zero_stage == 1,
        fp16=False,
        params_dtype=torch.bfloat16 if precision == "bf16" and parallel.zero_stage == 1
        else torch.float32,
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
    """Bytes of Adam moments and fp32 master weights held by this rank (ZeRO-1/2/3 shard them).

    Under zero_stage 2/3 the state tensors are DTensor shards: their local part is counted.
    """
    parts = optimizer_parts(megatron_optimizer)
    total = 0
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    total += _local_bytes(value)
        # fp32 master copies under bf16: the distributed optimizer's shards (ZeRO-1), else
        # the plain optimizer's copies (none at ZeRO-2/3: the fp32 shards are the masters).
        masters = getattr(part, "shard_fp32_from_float16_groups", None)
        if masters is None:
            masters = getattr(part, "fp32_from_float16_groups", None)
        for group in masters or []:
            total += sum(_local_bytes(p) for p in group)
    return total


def _local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank stores for `tensor` (the local shard of a DTensor)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()
