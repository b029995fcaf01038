"""Workers for the ZeRO-stage tests: one world trains the same model at zero_stage 1, 2 and 3."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from torch.distributed.tensor import DTensor

from tests.distributed.workers import build_trainer, tiny_config


def full_grads(trainer) -> dict[str, torch.Tensor]:
    """Every parameter's whole finalized gradient on this rank, keyed by global name.

    ZeRO-1 keeps the full gradient in `main_grad` (reduced with force_all_reduce); ZeRO-2/3
    hold a DTensor shard in `grad`, gathered here (collective over the data-parallel group).
    """
    from megatron_keye.models.keye_vl.builder import named_parameters_global

    out = {}
    for chunk in trainer.model:
        for name, param in named_parameters_global(chunk).items():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            out[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    return out


def held_bytes(trainer) -> dict[str, int]:
    """Bytes of gradient and parameter storage this rank holds after a step's backward.

    Gradients: megatron DDP's gradient buffers (ZeRO-1 holds the whole buffer on every rank) or
    the local shards of FSDP2's sharded gradients. Parameters: the local tensors at rest.
    """
    grads = 0
    for chunk in trainer.model:
        if isinstance(chunk, DistributedDataParallel):  # contiguous gradient buffers
            buffers = chunk.buffers + chunk.expert_parallel_buffers
            grads += sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
            continue
        for param in chunk.parameters():
            if param.grad is not None:
                local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
                grads += local.numel() * local.element_size()
    params = 0
    for chunk in trainer.model:
        for param in chunk.parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            params += local.numel() * local.element_size()
    return {"grads": grads, "params": params}


def reshards_after_forward(trainer) -> list[bool]:
    """Per FSDP2 transformer-layer unit: whether it frees its gathered parameters after forward."""
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.distributed.fsdp import FSDPModule

    flags = []
    for chunk in trainer.model:
        for module in chunk.modules():
            if isinstance(module, FSDPModule) and isinstance(module, TransformerLayer):
                group = module._get_fsdp_state()._fsdp_param_group
                flags.append(group.post_forward_mesh_info is not None)
    return flags


def stage_run(*, layout: dict, batches: list[dict], stage: int, steps: int,
              save_dir: str | None = None, save_at: int = 0) -> dict:
    """Loss and full gradients of batch 0, bytes held, then `steps` optimizer steps.

    With `save_dir`, a checkpoint is written after step `save_at` and, after the last step, a
    fresh trainer pointed at `save_dir` resumes from it (as a requeued job would) and takes the
    remaining steps again: their losses are returned under "resumed".
    """
    from megatron_keye.runtime.optim import optimizer_state_bytes

    extra = [f"parallel.zero_stage={stage}"]
    if save_dir:
        extra.append(f"checkpoint.save_dir={save_dir}")
    config = tiny_config(layout, extra=tuple(extra))
    trainer = build_trainer(config, batches, None)
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    reports = trainer.forward_backward(trainer.loader.next_step(), force_all_reduce=True)
    total, count = trainer.step_runner.global_reports(reports)["__loss__"]
    held = held_bytes(trainer)
    grads = full_grads(trainer)
    trainer.loader.step = 0
    steps_taken = []
    for _ in range(steps):
        steps_taken.append(trainer.train_step(trainer.loader.next_step()))
        trainer.iteration += 1
        if save_dir and trainer.iteration == save_at:
            trainer.save()
    result = {
        "loss": total / count,
        "grads": grads,
        "held": held,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "losses": [s.loss for s in steps_taken],
        "grad_norms": [s.grad_norm for s in steps_taken],
        "reshard_after_forward": reshards_after_forward(trainer),
    }
    if save_dir:
        resumed = build_trainer(config, batches, None)  # loads save_dir's latest checkpoint
        result["resumed_from"] = resumed.iteration
        result["resumed"] = [resumed.train_step(resumed.loader.next_step()).loss
                             for _ in range(steps - resumed.iteration)]
    return result


def eval_loss(trainer, step: int) -> float:
    """The global loss of batch `step` under the trainer's current weights (no update)."""
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.loader.step = step
    reports = trainer.forward_backward(trainer.loader.next_step(), force_all_reduce=True)
    total, count = trainer.step_runner.global_reports(reports)["__loss__"]
    return total / count


def cross_stage_loads(*, batches: list[dict], save_dir: str, resave_dir: str, at: int) -> dict:
    """A zero_stage 2 checkpoint (DP=2, `save_dir`) seeds other stages and layouts.

    Returns the evaluation loss of batch `at` after loading its weights at zero_stage 1 with
    TP=2 (whose weights it then saves into `resave_dir`), at zero_stage 3 with DP=2, and of that zero_stage
    1 checkpoint loaded back at zero_stage 2; plus the error of a zero_stage 1 run asking for
    the zero_stage 2 checkpoint's optimizer state too.
    """
    def seeded(source: str, layout: dict, stage: int, *extra: str, state: str = "weights"):
        config = tiny_config(layout, extra=(f"parallel.zero_stage={stage}",
                                            f"checkpoint.load={source}",
                                            f"checkpoint.load_state={state}", *extra))
        return build_trainer(config, batches, None)

    out = {}
    zero1_tp2 = seeded(save_dir, {"tensor": 2}, 1, f"checkpoint.save_dir={resave_dir}")
    out["zero2_to_zero1_tp2"] = eval_loss(zero1_tp2, at)
    # Weights only: megatron-core's distributed optimizer cannot write a state before its
    # first step (distrib_optimizer.state_dict wants one Adam `step`).
    zero1_tp2.checkpointer.save(chunks=zero1_tp2.model, optimizer=None,
                                state=zero1_tp2.training_state())
    out["zero2_to_zero3"] = eval_loss(seeded(save_dir, {}, 3), at)
    out["zero1_tp2_to_zero2"] = eval_loss(seeded(resave_dir, {}, 2), at)
    try:
        seeded(save_dir, {}, 1, state="weights+optimizer")
        out["optimizer_cross_stage_error"] = None
    except ValueError as err:
        out["optimizer_cross_stage_error"] = str(err)
    return out


def zero_stages_worker(*, layout: dict, batches: list[dict], stages: tuple[int, ...], steps: int,
                       save_dir: str | None = None, save_stage: int = 2, save_at: int = 0,
                       resave_dir: str | None = None, bf16_stages: tuple[int, ...] = (),
                       bf16_save_dir: str | None = None):
    """Every stage's `stage_run` in this world (stage `save_stage` with the checkpoint round
    trip when `save_dir` is given, then `cross_stage_loads` of that checkpoint), then each of
    `bf16_stages`' `bf16_stage_run` (zero_stage 3 saving into and resuming from
    `bf16_save_dir`), under key ("bf16", stage)."""
    results = {
        stage: stage_run(layout=layout, batches=batches, stage=stage, steps=steps,
                         save_dir=save_dir if stage == save_stage else None, save_at=save_at)
        for stage in stages
    }
    if save_dir and resave_dir:
        results["cross_stage"] = cross_stage_loads(batches=batches, save_dir=save_dir,
                                                   resave_dir=resave_dir, at=save_at)
    for stage in bf16_stages:
        results[("bf16", stage)] = bf16_stage_run(
            layout=layout, batches=batches, stage=stage, steps=steps,
            save_dir=bf16_save_dir if stage == 3 else None, save_at=save_at)
    dist.barrier()
    return results


def _dtype_names(tensors) -> set[str]:
    return {str(t.dtype) for t in tensors}


def _float_dtypes(value, out: set[str], depth: int = 0) -> None:
    """Add the dtype of every floating tensor in `value` (nested containers, dataclasses)."""
    import dataclasses

    if depth > 4:
        return
    if torch.is_tensor(value):
        if value.is_floating_point():
            out.add(str(value.dtype))
    elif isinstance(value, (list, tuple)):
        for item in value:
            _float_dtypes(item, out, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _float_dtypes(item, out, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _float_dtypes(getattr(value, field.name), out, depth + 1)


def precision_report(trainer) -> dict:
    """Where each dtype lives after a bf16 step: compute weights, stored parameters, optimizer.

    "compute": the dtypes of the weights modules see inside forward (FSDP2's gathered copies at
    zero_stage 2/3); "layer_inputs": the dtypes of the floating tensors each transformer layer
    receives (hidden states, rotary tables); "stored": the parameters at rest (local shards); "masters": the tensors
    the optimizer updates; "adam": its moment tensors; "reduce": the dtype gradients are summed
    over data ranks in (megatron DDP's buffers, or FSDP2's reduce dtype); "grads": the dtype of
    the reduced gradient the optimizer reads; "updates_module_params": whether the tensors the
    optimizer updates are the module's own parameters (FSDP2's fp32 shards) rather than copies.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.distributed.fsdp import FSDPModule

    from megatron_keye.runtime.mcore_fallback import optimizer_parts

    seen: set[str] = set()
    layer_inputs: set[str] = set()
    hooks = []
    for chunk in trainer.model:
        for module in chunk.modules():
            if "weight" in module._parameters:
                hooks.append(module.register_forward_pre_hook(
                    lambda mod, _args: seen.add(str(mod.weight.dtype))))
            if isinstance(module, TransformerLayer):  # after FSDP2's own pre-forward hook
                hooks.append(module.register_forward_pre_hook(
                    lambda _mod, args, kwargs: _float_dtypes((args, kwargs), layer_inputs),
                    with_kwargs=True))
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.loader.step = 0
    trainer.forward_backward(trainer.loader.next_step(), force_all_reduce=True)
    for hook in hooks:
        hook.remove()
    reduce, grads = set(), set()
    for chunk in trainer.model:
        if isinstance(chunk, DistributedDataParallel):
            reduce |= _dtype_names(b.grad_data for b in chunk.buffers)
            grads |= _dtype_names(p.main_grad for p in chunk.parameters())
            continue
        for module in chunk.modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                for fsdp_param in group.fsdp_params if group else []:
                    reduce.add(str(fsdp_param.reduce_dtype or fsdp_param.param_dtype
                                   or fsdp_param.orig_dtype))
        grads |= _dtype_names(p.grad for p in chunk.parameters() if p.grad is not None)
    masters, adam = set(), set()
    for part in optimizer_parts(trainer.optimizer):
        groups = getattr(part, "shard_fp32_from_float16_groups", None)
        if groups is None:
            groups = getattr(part, "fp32_from_float16_groups", None)
        if not groups:
            groups = [g["params"] for g in part.optimizer.param_groups]
        masters |= _dtype_names(p for g in groups for p in g)
        for state in part.optimizer.state.values():
            adam |= _dtype_names(v for v in state.values() if torch.is_tensor(v) and v.dim())
    stored = _dtype_names(p for chunk in trainer.model for p in chunk.parameters())
    module_params = {id(p) for chunk in trainer.model for p in chunk.parameters()}
    updated = [p for part in optimizer_parts(trainer.optimizer)
               for g in part.optimizer.param_groups for p in g["params"]]
    return {"compute": seen, "layer_inputs": layer_inputs, "stored": stored,
            "masters": masters, "adam": adam,
            "reduce": reduce, "grads": grads,
            "updates_module_params": all(id(p) in module_params for p in updated)}


def whole_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter's whole stored tensor keyed by global name (DTensors gathered)."""
    from megatron_keye.models.keye_vl.builder import named_parameters_global

    out = {}
    for chunk in trainer.model:
        for name, param in named_parameters_global(chunk).items():
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            out[name] = whole.detach().clone()
    return out


def bf16_stage_run(*, layout: dict, batches: list[dict], stage: int, steps: int,
                   save_dir: str | None = None, save_at: int = 0) -> dict:
    """`steps` bf16 optimizer steps at `stage`: losses, gradient norms, the whole stored weights
    after the first and the last step (bf16 parameters at zero_stage 1, fp32 master shards at
    2/3), and `precision_report`.

    With `save_dir` a checkpoint is written after step `save_at`; a fresh trainer resumes from
    it and retakes the remaining steps ("resumed" losses and "resumed_weights"), and a bf16
    zero_stage 1 run seeded with its weights evaluates batch `save_at` ("zero1_eval").
    """
    extra = [f"parallel.zero_stage={stage}", "precision=bf16"]
    if save_dir:
        extra.append(f"checkpoint.save_dir={save_dir}")
    config = tiny_config(layout, extra=tuple(extra))
    trainer = build_trainer(config, batches, None)
    trainer.loader.step = 0
    taken = []
    for _ in range(steps):
        taken.append(trainer.train_step(trainer.loader.next_step()))
        trainer.iteration += 1
        if trainer.iteration == 1:
            first_weights = whole_weights(trainer)
        if save_dir and trainer.iteration == save_at:
            trainer.save()
    result = {"losses": [s.loss for s in taken], "grad_norms": [s.grad_norm for s in taken],
              "applied": [s.applied for s in taken], "first_weights": first_weights,
              "weights": whole_weights(trainer)}
    if save_dir:
        resumed = build_trainer(config, batches, None)
        result["resumed_from"] = resumed.iteration
        result["resumed"] = [resumed.train_step(resumed.loader.next_step()).loss
                             for _ in range(steps - resumed.iteration)]
        result["resumed_weights"] = whole_weights(resumed)
        # Its weights (the fp32 masters) seed a bf16 zero_stage 1 run (bf16 parameters).
        seeded = build_trainer(tiny_config(layout, extra=(
            "parallel.zero_stage=1", "precision=bf16", f"checkpoint.load={save_dir}",
            "checkpoint.load_state=weights")), batches, None)
        result["zero1_eval"] = eval_loss(seeded, save_at)
    result["dtypes"] = precision_report(trainer)
    return result
