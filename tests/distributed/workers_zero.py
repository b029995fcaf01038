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


def full_params(trainer) -> dict[str, torch.Tensor]:
    from megatron_keye.models.keye_vl.builder import named_parameters_global

    out = {}
    for chunk in trainer.model:
        for name, param in named_parameters_global(chunk).items():
            data = param.full_tensor() if isinstance(param, DTensor) else param
            out[name] = data.detach().clone()
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


def zero_stage_worker(*, layout: dict, batches: list[dict], stages: tuple[int, ...], steps: int):
    """Per stage: loss and full gradients of the first batch, held bytes, then `steps` steps."""
    from megatron_keye.runtime.optim import optimizer_state_bytes

    results = {}
    for stage in stages:
        config = tiny_config(layout, extra=(f"parallel.zero_stage={stage}",))
        trainer = build_trainer(config, batches, None)
        for chunk in trainer.model:
            chunk.zero_grad_buffer()
        reports = trainer.forward_backward(trainer.loader.next_step(), force_all_reduce=True)
        total, count = trainer.step_runner.global_reports(reports)["__loss__"]
        held = held_bytes(trainer)
        grads = full_grads(trainer)
        trainer.loader.step = 0
        losses, norms = [], []
        for _ in range(steps):
            step = trainer.train_step(trainer.loader.next_step())
            losses.append(step.loss)
            norms.append(step.grad_norm)
        results[stage] = {
            "loss": total / count,
            "grads": grads,
            "held": held,
            "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
            "losses": losses,
            "grad_norms": norms,
            "params_after": full_params(trainer),
        }
        dist.barrier()
    return results


def resume_worker(*, layout: dict, batches: list[dict], save_dir: str, stage: int,
                  train_iters: int, stop_at: int):
    """At `stage`: an uninterrupted run, then one stopped (with a checkpoint) at `stop_at` and
    the same command again, which resumes from the checkpoint. Losses of each run."""
    from tests.distributed.workers_checkpoint import run_worker

    stage_flag = (f"parallel.zero_stage={stage}",)
    whole = run_worker(layout=layout, weights=None, batches=batches, train_iters=train_iters,
                       extra=stage_flag)
    first = run_worker(layout=layout, weights=None, batches=batches, train_iters=train_iters,
                       save_dir=save_dir,
                       extra=(*stage_flag, f"schedule.exit_at_iteration={stop_at}"))
    second = run_worker(layout=layout, weights=None, batches=batches, train_iters=train_iters,
                        save_dir=save_dir, extra=stage_flag)
    return {"whole": whole, "first": first, "second": second}
