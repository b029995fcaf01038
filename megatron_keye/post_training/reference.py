"""Reference-model log-probs for preference heads (DPO/BCO/MPO).

Two ways to get log p_ref(label) per token:
- a frozen reference model held next to the policy on the same layout
  (`stage.head.preference.reference: model`): the trainer builds and loads it
  (`runtime.frozen_model.build_frozen_model`), and the model step forwards it before the policy
  every step (`runtime/step.py`);
- precomputed once (`reference: precomputed`): `reference_logprobs` runs a checkpoint over
  micro-batches and returns full-row [b, s] log-probs (CP shares merged back), which a pass
  writes next to the data so training needs no second model.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_keye.config.schema import TrainConfig
from megatron_keye.runtime.frozen_model import build_frozen_model

# The frozen-model builder lives in runtime/ (the trainer builds the reference with it); the
# name under which preference stages knew it stays.
build_reference_model = build_frozen_model


def reference_logprobs(step, microbatches: list[dict]) -> list[torch.Tensor] | None:
    """Full-row log p(label) [b, s] (fp32, CPU) per micro-batch from `step.reference_model`.

    `step` is a `runtime.step.ModelStep` whose `reference_model` holds the reference chunks.
    Returns the tensors on the last pipeline stage (every TP and CP rank of it), None elsewhere.
    Positions whose label is ignored (-100) hold 0.
    """
    from megatron_keye.runtime.step import _REFERENCE_STASH

    if step.reference_model is None:
        raise ValueError("reference_logprobs: the model step has no reference model")
    batches = [dict(mb) for mb in microbatches]
    step._reference_pass(batches)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    results = []
    for source in batches:
        local = source[_REFERENCE_STASH].cpu()
        if step.cp_size > 1:
            from megatron_keye.ops.collectives import all_reduce_values
            from megatron_keye.runtime.context_split import row_positions

            # every CP rank drops its share into a zero full row; a sum merges them exactly
            positions = row_positions(source, cp_size=step.cp_size, cp_rank=step.cp_rank)
            full = torch.zeros(source["tokens"].shape, dtype=torch.float32)
            full.scatter_(1, positions.cpu(), local)
            local = all_reduce_values(full, group=parallel_state.get_context_parallel_group(),
                                      dtype=torch.float32)
        results.append(local)
    return results


def reference_logprobs_from_checkpoint(cfg: TrainConfig, checkpoint: str,
                                       microbatches: list[dict]) -> list[torch.Tensor] | None:
    """Full-row reference log p(label) [b, s] per micro-batch from a native checkpoint.

    Runs in an initialized parallel state of `cfg.parallel`'s layout (any TP/PP/CP); builds the
    frozen model, forwards the micro-batches and returns the merged rows on the last pipeline
    stage (None elsewhere). This is what a precomputing pass stores next to the data.
    """
    from megatron_keye.runtime.parallel import compute_device
    from megatron_keye.runtime.step import ModelStep

    device = compute_device()
    chunks = build_frozen_model(cfg, device, layout={}, source=checkpoint)
    step = ModelStep(model=chunks, loss_head=None, device=device,
                     seq_length=cfg.data.seq_length,
                     micro_batch_size=cfg.schedule.micro_batch_size,
                     reference_model=chunks, vocab_size=cfg.model.vocab_size)
    return reference_logprobs(step, microbatches)
