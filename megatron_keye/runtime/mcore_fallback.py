"""Fixes for megatron-core 0.16.1's torch-optimizer fallback path (no TransformerEngine, no apex).

Without TE or apex, megatron-core's distributed optimizer wraps `torch.optim.AdamW`, whose state
holds a per-parameter `step` that the TE/apex FusedAdam does not. Places in megatron-core miss
that case; they are fixed here and applied only when the fallback is in use (always on CPU, never
on a TE-equipped GPU cluster). Covered by the checkpoint resume and resharding tests, which
fail without them.
"""

from __future__ import annotations

import torch

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
    _skip_step_when_restoring_param_state()
    _unshare_step_counters_after_load()
    _APPLIED = True


def _skip_step_when_restoring_param_state() -> None:
    """optimizer/distrib_optimizer.py:938-940 copies every key of the live state, 'step' included,
    from the loaded per-parameter tensors, which never carry 'step' (the caller drops it at :2101
    and restores it from the param groups at :819-825): KeyError on every fully_reshardable load.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _unshare_step_counters_after_load() -> None:
    """optimizer/distrib_optimizer.py:821-825 gives every parameter's state the *same* 'step'
    tensor; torch's AdamW increments each parameter's step in place, so after a resume one step
    adds the parameter count to all of them and Adam's bias correction goes wrong. Give each
    parameter its own counter after loading.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()
        return result

    DistributedOptimizer.load_state_dict = load_state_dict


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
