"""Fixes for megatron-core 0.16.1's torch-optimizer fallback path (no TransformerEngine, no apex).

Without TE or apex, megatron-core's distributed optimizer wraps `torch.optim.AdamW`, whose state
holds a per-parameter `step` that the TE/apex FusedAdam does not. Places in megatron-core miss
that case; they are fixed here and applied only when the fallback is in use (always on CPU, never
on a TE-equipped GPU cluster). The patched sites are those of megatron-core 0.16.1, which
`apply()` checks first. Covered by the checkpoint resume and resharding tests, which fail without
them; `match_step_devices` by `tests/unit/test_mcore_patches.py`.
"""

from __future__ import annotations

import torch

from megatron_keye.mcore_version import require_supported_mcore

_APPLIED = False


def in_use() -> bool:
    """True when megatron-core's distributed optimizer runs on torch's AdamW."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def apply() -> None:
    """Install the fixes once, if the fallback is in use."""
    global _APPLIED
    if _APPLIED or not in_use():
        return
    require_supported_mcore("megatron_keye.runtime.mcore_fallback")
    _skip_step_when_restoring_param_state()
    _unshare_step_counters_after_load()
    _APPLIED = True


def _skip_step_when_restoring_param_state() -> None:
    """optimizer/distrib_optimizer.py:938-940 copies every key of the live state, 'step' included,
    from the loaded per-parameter tensors, which never carry the saved 'step' (the caller restores
    it from the param groups at :819-825): fully_reshardable loads drop it (:2101, a KeyError here)
    and dp_reshardable loads carry the load template's stale counter (a LocalNonpersistentObject,
    :1664-1667), which would reset Adam's bias correction. Keep the restored step.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _unshare_step_counters_after_load() -> None:
    """optimizer/distrib_optimizer.py:821-825 gives every parameter's state the *same* 'step'
    tensor, on the CPU; torch's AdamW increments each parameter's step in place, so after a
    resume one step adds the parameter count to all of them and Adam's bias correction goes
    wrong, and the fused kernel refuses a CPU step beside CUDA parameters. After loading, give
    each parameter its own counter, where torch keeps it (`own_step_counters`).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        own_step_counters(self)
        return result

    DistributedOptimizer.load_state_dict = load_state_dict


@torch.no_grad()
def own_step_counters(megatron_optimizer) -> None:
    """Every parameter's 'step' its own tensor, on the device torch expects (after a load)."""
    for part in optimizer_parts(megatron_optimizer):
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()
    match_step_devices(megatron_optimizer)


def optimizer_parts(megatron_optimizer) -> list:
    """The optimizers inside a megatron-core optimizer: a ChainedOptimizer's parts, or itself."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    if isinstance(megatron_optimizer, ChainedOptimizer):
        return list(megatron_optimizer.chained_optimizers)
    return [megatron_optimizer]


@torch.no_grad()
def ensure_optimizer_state(megatron_optimizer) -> None:
    """Allocate Adam moments and step counters that a fresh optimizer does not have yet.

    Loading builds a template from the live optimizer's state, and megatron-core's distributed
    optimizer reads a per-parameter 'step' there (optimizer/distrib_optimizer.py:640) that torch
    creates only on the first update. No-op on the TE/apex path.
    """
    if not in_use():
        return
    parts = optimizer_parts(megatron_optimizer)
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state.setdefault("step", torch.tensor(0.0))


@torch.no_grad()
def match_step_devices(megatron_optimizer) -> int:
    """Put every torch-optimizer 'step' counter where torch's own loading would; returns how many moved.

    megatron-core's distributed optimizer restores 'step' from the param groups as CPU tensors
    (optimizer/distrib_optimizer.py:819-825). torch keeps 'step' on the CPU for its plain AdamW
    but on the parameter's device (as float32) for the fused and capturable kernels, which
    refuse a CPU step next to CUDA parameters. So after a resume the fused AdamW we enable on GPU
    (`optim._use_fused_torch_adamw`) would fail on its first update. Runs after every load of
    the distributed optimizer (the patched `load_state_dict`; torch's own `load_state_dict`,
    used by the other megatron optimizers, already does this); a no-op when nothing is misplaced
    (always on CPU, and on the TE/apex path, which keeps no per-parameter step).
    """
    moved = 0
    for part in optimizer_parts(megatron_optimizer):
        inner = getattr(part, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            continue
        for group in inner.param_groups:
            on_param_device = bool(group.get("fused") or group.get("capturable"))
            for param in group["params"]:
                state = inner.state.get(param)
                step = state.get("step") if state else None
                if not torch.is_tensor(step):
                    continue
                if on_param_device:
                    target_device, target_dtype = param.device, torch.float32
                else:
                    target_device, target_dtype = torch.device("cpu"), step.dtype
                if step.device != target_device or step.dtype != target_dtype:
                    state["step"] = step.to(device=target_device, dtype=target_dtype)
                    moved += 1
    return moved
