"""Frozen model chunks next to the trained ones: a preference head's reference, a reward model.

`build_frozen_model` builds this rank's chunks for a config on the given layout, loads their
weights from a native checkpoint and freezes them (eval mode, no gradients). Building chunks
and loading a checkpoint is the runtime's job, so the trainer builds a preference head's frozen
reference here without reaching up into `post_training/`, which uses the same builder for its
reference passes and the RL stage's reward model.
"""

from __future__ import annotations

import torch

from megatron_keye.config import config_to_dict
from megatron_keye.config.schema import TrainConfig
from megatron_keye.models.keye_vl.builder import build_model_chunks
from megatron_keye.runtime.checkpoint import Checkpointer


def build_frozen_model(cfg: TrainConfig, device: torch.device, *, layout: dict,
                       source: str | None) -> list[torch.nn.Module]:
    """Frozen model chunks of this rank (same layout as the policy), weights from `source`."""
    if not source:
        raise ValueError("stage.head.preference.reference_load: a frozen reference model needs a "
                         "checkpoint (reference_load or checkpoint.load)")
    chunks = build_model_chunks(cfg, device)
    Checkpointer(cfg.checkpoint, run_config=config_to_dict(cfg), layout=layout).load(
        source, chunks=chunks, optimizer=None, weights_only=True
    )
    for chunk in chunks:
        chunk.eval()
        for param in chunk.parameters():
            param.requires_grad_(False)
    return chunks
