"""The `mlp_AR` projector of Keye-VL-1.5 (spec section 1.2), tensor parallel.

Each image or video frame's patch features (raster order over its (h, w) grid) are merged 2×2:
the token at (i, j) of the (h/2, w/2) grid concatenates patches (2i, 2j), (2i, 2j+1),
(2i+1, 2j), (2i+1, 2j+1) — `rearrange("(t h p1 w p2) d -> (t h w) (p1 p2 d)")` — so tokens come
out frame by frame in raster order, the order of the placeholder tokens. Then
LayerNorm(4·hidden, eps 1e-5) → linear_1 (column parallel) → exact GELU → linear_2 (row
parallel) to the language model's width. Input and output are replicated over the
tensor-parallel group (the row-parallel output is all-reduced, not sequence-scattered): the
model merges the result into token embeddings before its own sequence-parallel scatter.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from megatron_keye.config.schema import ParallelConfig, VisionConfig
from megatron_keye.models.keye_vl.vision import frame_grids, vision_transformer_config
from megatron_keye.ops.norm import LayerNorm

PROJECTOR_TP_SPLIT = {"linear_1.weight": 0, "linear_1.bias": 0, "linear_2.weight": 1}


def merge_index(frames: list[tuple[int, int]], merge: int, *, device=None) -> torch.Tensor:
    """[P / merge², merge²] patch row of each part of each merged token, frame after frame."""
    pieces, offset = [], 0
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for n, (h, w) in enumerate(frames):
        if h % merge or w % merge:
            raise ValueError(f"vision_grids: frame {n} has grid (h={h}, w={w}), not divisible "
                             f"by the projector's spatial_merge_size={merge}")
        if (h, w) not in cache:
            index = torch.arange(h * w, device=device).view(h // merge, merge, w // merge, merge)
            cache[h, w] = index.permute(0, 2, 1, 3).reshape(-1, merge * merge)
        pieces.append(cache[h, w] + offset)
        offset += h * w
    if not pieces:
        return torch.zeros(0, merge * merge, dtype=torch.int64, device=device)
    return torch.cat(pieces)


def merge_patches(features: torch.Tensor, grids: torch.Tensor, merge: int) -> torch.Tensor:
    """[P, d] per-frame raster patch features → [P / merge², merge² · d] merged tokens."""
    index = merge_index(frame_grids(grids.cpu()), merge, device=features.device)
    if index.numel() != features.size(0):
        raise ValueError(f"features has {features.size(0)} rows, vision_grids describe "
                         f"{index.numel()} patches")
    return features[index].reshape(index.size(0), index.size(1) * features.size(-1))


class Projector(MegatronModule):
    """2x2 merge of each frame's patches → LayerNorm → Linear → GELU → Linear to the LM width."""

    def __init__(self, config: VisionConfig, *, lm_hidden_size: int,
                 parallel: ParallelConfig | None = None, precision: str = "fp32"):
        tconfig = vision_transformer_config(config, parallel or ParallelConfig(),
                                            precision=precision)
        # Replicated input and output: no sequence-parallel scatter inside the projector.
        tconfig = dataclasses.replace(tconfig, sequence_parallel=False)
        super().__init__(config=tconfig)
        self.vision_config = config
        width = config.merged_size
        self.pre_norm = LayerNorm(tconfig, width, eps=config.projector_norm_eps)
        self.linear_1 = ColumnParallelLinear(
            width, width, config=tconfig, init_method=tconfig.init_method, bias=True,
            gather_output=False, skip_bias_add=False,
        )
        self.linear_2 = RowParallelLinear(
            width, lm_hidden_size, config=tconfig, init_method=tconfig.init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    @staticmethod
    def tensor_parallel_dim(name: str) -> int | None:
        """The dim this parameter (projector-local name) is split along over TP ranks, or None."""
        for suffix, dim in PROJECTOR_TP_SPLIT.items():
            if name.endswith(suffix):
                return dim
        return None

    def init_std(self, name: str) -> float:
        """Normal-init std of a weight matrix (projector-local name)."""
        return self.vision_config.init_std

    def forward(self, features: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """features [P, vision_hidden], grids [n, 3] → [P / 4, lm_hidden], placeholder order."""
        merged = merge_patches(features, grids, self.vision_config.spatial_merge_size)
        hidden = self.pre_norm(merged).unsqueeze(1)  # [tokens, b=1, 4·hidden]
        hidden, _ = self.linear_1(hidden)
        hidden, _ = self.linear_2(F.gelu(hidden))
        return hidden[:, 0]
