"""The SigLIP-style vision tower of Keye-VL-1.5 (spec section 1.1), tensor and sequence parallel.

Skeleton: the interface is fixed, the implementation lands in the next commit.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_keye.config.schema import ParallelConfig, VisionConfig


class VisionTower(MegatronModule):
    """Patch rows of many images and video frames → one feature row per patch."""

    def __init__(self, config: VisionConfig, *, parallel: ParallelConfig | None = None,
                 precision: str = "fp32", attention_backend: str = "auto"):
        raise NotImplementedError("VisionTower: implementation in progress")

    def forward(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, 3, 14, 14], grids [n, 3] (t, h, w) → [P, hidden], input row order."""
        raise NotImplementedError
