"""Worker functions for the runtime tests (freezing, CPU-shim scoping), run in spawned worlds."""

from __future__ import annotations


def freeze_worker(*, layout: dict, patterns: list[str]) -> dict:
    """Build this rank's chunks in `layout`, freeze `patterns`; report global names."""
    from megatron_keye.models.keye_vl.builder import build_model_chunks, named_parameters_global
    from megatron_keye.runtime.optim import freeze_parameters
    from megatron_keye.runtime.parallel import ParallelDims
    from tests.distributed.workers import tiny_config

    config = tiny_config(layout)
    ParallelDims(pipeline=layout.get("pipeline", 1),
                 virtual_pipeline=layout.get("vpp", 1)).initialize(seed=0)
    chunks = build_model_chunks(config)
    count = freeze_parameters(chunks, patterns)
    names = {}
    for chunk in chunks:
        names.update(named_parameters_global(chunk))
    return {
        "count": count,
        "frozen": sorted(n for n, p in names.items() if not p.requires_grad),
        "all": sorted(names),
    }


def cuda_scoping_worker() -> dict:
    """With CUDA reported available, `cpu_compat.apply()` must leave everything as it was."""
    import os

    import torch
    from torch.overrides import _get_current_function_mode_stack

    os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    import megatron.core.tensor_parallel.random as mc_random
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    watched = {
        "torch.cuda.current_device": (torch.cuda, "current_device"),
        "torch.cuda.get_rng_state": (torch.cuda, "get_rng_state"),
        "torch.cuda.manual_seed": (torch.cuda, "manual_seed"),
        "torch.cuda.synchronize": (torch.cuda, "synchronize"),
        "Tensor.cuda": (torch.Tensor, "cuda"),
        "Tensor.type": (torch.Tensor, "type"),
        "random._get_cuda_rng_state": (mc_random, "_get_cuda_rng_state"),
        "random._set_cuda_rng_state": (mc_random, "_set_cuda_rng_state"),
        "DistributedOptimizer.__init__": (distrib_optimizer.DistributedOptimizer, "__init__"),
        "Float16Optimizer.__init__": (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        "clip_grads.clip_grad_by_total_norm_fp32": (clip_grads, "clip_grad_by_total_norm_fp32"),
        "optimizer.clip_grad_by_total_norm_fp32": (optimizer, "clip_grad_by_total_norm_fp32"),
        "buffers.dist_reduce_scatter_func": (buffers, "dist_reduce_scatter_func"),
        "buffers.dist_all_gather_func": (buffers, "dist_all_gather_func"),
    }
    before = {k: getattr(owner, name) for k, (owner, name) in watched.items()}
    modes_before = len(_get_current_function_mode_stack())
    torch.cuda.is_available = lambda: True

    from megatron_keye.runtime import cpu_compat

    active = cpu_compat.apply()
    changed = sorted(k for k, (owner, name) in watched.items() if getattr(owner, name) is not before[k])
    modes = [type(m).__name__ for m in _get_current_function_mode_stack()]
    return {
        "active": active,
        "is_applied": cpu_compat.is_applied(),
        "changed": changed,
        "new_modes": modes[modes_before:],
        "max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
    }
