"""The `mlp_AR` projector of Keye-VL-1.5 (spec section 1.2), tensor parallel.

Skeleton: the interface is fixed, the implementation lands in the next commit.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_keye.config.schema import ParallelConfig, VisionConfig


class Projector(MegatronModule):
    """2x2 merge of each frame's patches → LayerNorm → Linear → GELU → Linear to the LM width."""

    def __init__(self, config: VisionConfig, *, lm_hidden_size: int,
                 parallel: ParallelConfig | None = None, precision: str = "fp32"):
        raise NotImplementedError("Projector: implementation in progress")

    def forward(self, features: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """features [P, vision_hidden], grids [n, 3] → [P / 4, lm_hidden], placeholder order."""
        raise NotImplementedError
