"""The SigLIP-style vision tower of Keye-VL-1.5 (spec section 1.1), tensor and sequence parallel.

All images and video frames of a batch are encoded in one packed sequence [P, 1, hidden]:

- patch embedding: a Conv2d(C, hidden, p, stride p) over each (C, p, p) patch row, computed as a
  linear map of the flattened row (the same numbers, no im2col);
- absolute positions: the learned G×G table (27×27 in Keye) bilinearly interpolated
  (align_corners=False, no antialias) to each image's or frame's (h, w) grid and added; a grid
  with t > 1 repeats it for each of its t frames;
- 2D RoPE in the core attention: rope dim = head_dim / 2 with inv_freq = θ^(-2i / rope_dim);
  the patch at raster index p of its frame has (hid, wid) = (p // w, p % w), dims [0, rope/2)
  rotate by hid and [rope/2, rope) by wid, paired rotate-half style with dim + head_dim / 2;
- attention: bidirectional within each frame only (one segment per image and per video frame),
  run by our core attention per sequence (no mask over all patches);
- pre-LN layers (LayerNorm eps 1e-6, MLP with gelu tanh) from megatron-core and a post-layernorm.

Tensor parallelism comes from megatron-core's column/row-parallel linears; with sequence
parallelism the packed sequence is padded to a multiple of the TP degree (the padding is a
segment of its own) and scattered, and the output is gathered back. The output is replicated
over the TP group: every rank returns the full [P, hidden] features in input row order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_keye.config.schema import ParallelConfig, VisionConfig
from megatron_keye.config.validation import check_vision_config
from megatron_keye.models.keye_vl.specs import vision_block_spec
from megatron_keye.ops.attention.core import resolve_backend
from megatron_keye.ops.attention.inputs import AttentionInputs
from megatron_keye.ops.attention.rope import RotaryTables

# How each tensor of the tower is split over tensor-parallel ranks (suffix → dim); the rest
# (norms, patch embedding, position table) is replicated. fc1 is plain (no gate/up halves).
VISION_TP_SPLIT = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "mlp.linear_fc2.weight": 1,
}
# Output projections whose init std is scaled by 1/sqrt(2 * num_layers) (megatron's scheme).
VISION_SCALED_INIT_SUFFIXES = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`gelu_pytorch_tanh`: GELU with the tanh approximation."""
    return F.gelu(x, approximate="tanh")


def vision_transformer_config(
    vision: VisionConfig, parallel: ParallelConfig, *, precision: str = "fp32"
) -> TransformerConfig:
    """megatron-core's TransformerConfig for the ViT layers.

    The tower is never pipeline- or context-split inside (it lives on the first pipeline stage;
    CP splits whole images between ranks outside it), so those degrees are 1 here. Activation
    recompute follows `vision.recompute`.
    """
    check_vision_config(vision, parallel)
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_attention_heads,
        num_query_groups=vision.num_attention_heads,
        kv_channels=vision.head_dim,
        ffn_hidden_size=vision.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=vision.layer_norm_eps,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        add_bias_linear=True,
        add_qkv_bias=True,
        qk_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=vision.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **_recompute_fields(vision.recompute),
    )


def _recompute_fields(recompute: str) -> dict:
    """megatron-core's settings for `model.vision.recompute`: full re-runs each ViT layer from
    its saved input in the backward pass (one layer per checkpoint, as the decoder's full mode),
    so the first stage keeps one hidden row per patch and layer instead of all activations."""
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    return {}


def check_grids(pixel_values: torch.Tensor, grids: torch.Tensor, vision: VisionConfig) -> None:
    """Raise a ValueError naming the field when patch rows and grids disagree."""
    expected = (vision.num_channels, vision.patch_size, vision.patch_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"pixel_values must be [patches, {', '.join(map(str, expected))}], "
                         f"got {tuple(pixel_values.shape)}")
    if grids.dim() != 2 or grids.size(1) != 3:
        raise ValueError(f"vision_grids must be [items, 3] (t, h, w), got {tuple(grids.shape)}")
    if grids.numel() and int(grids.min()) <= 0:
        bad = int((grids <= 0).any(dim=1).nonzero()[0])
        raise ValueError(f"vision_grids[{bad}] = {grids[bad].tolist()} has a non-positive size")
    patches = int(grids.prod(dim=1).sum())
    if patches != pixel_values.size(0):
        raise ValueError(f"pixel_values has {pixel_values.size(0)} patch rows, vision_grids "
                         f"describe {patches}")


def frame_grids(grids: torch.Tensor) -> list[tuple[int, int]]:
    """(h, w) of every frame: a (t, h, w) grid is t frames of (h, w), in order."""
    out = []
    for t, h, w in grids.tolist():
        out += [(h, w)] * t
    return out


class VisionTower(MegatronModule):
    """Patch rows of many images and video frames → one feature row per patch."""

    def __init__(self, config: VisionConfig, *, parallel: ParallelConfig | None = None,
                 precision: str = "fp32", attention_backend: str = "auto"):
        tconfig = vision_transformer_config(config, parallel or ParallelConfig(),
                                            precision=precision)
        super().__init__(config=tconfig)
        self.vision_config = config
        backend = attention_backend if attention_backend == "te" else resolve_backend(
            attention_backend, dtype=tconfig.params_dtype
        )
        dtype = tconfig.params_dtype
        self.patch_embedding = torch.nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size,
            dtype=dtype,
        )
        # Vectors start at deterministic values (the per-name init redraws only matrices).
        torch.nn.init.zeros_(self.patch_embedding.bias)
        self.position_embedding = torch.nn.Embedding(config.position_grid**2,
                                                     config.hidden_size, dtype=dtype)
        self.encoder = TransformerBlock(
            config=tconfig,
            spec=vision_block_spec(tconfig, attention_backend=backend),
            pre_process=True,
            post_process=True,
        )
        rope_dim = config.head_dim // 2
        exponents = torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta**exponents), persistent=False)

    @staticmethod
    def tensor_parallel_dim(name: str) -> int | None:
        """The dim this parameter (tower-local name) is split along over TP ranks, or None."""
        for suffix, dim in VISION_TP_SPLIT.items():
            if name.endswith(suffix):
                return dim
        return None

    def init_std(self, name: str) -> float:
        """Normal-init std of a weight matrix (tower-local name)."""
        std = self.vision_config.init_std
        if name.endswith(VISION_SCALED_INIT_SUFFIXES):
            std /= math.sqrt(2.0 * self.vision_config.num_layers)
        return std

    def forward(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, C, p, p], grids [n, 3] (t, h, w) in patch units → [P, hidden].

        Rows come out in input order; every tensor-parallel rank returns the full result.
        """
        check_grids(pixel_values, grids, self.vision_config)
        vc = self.vision_config
        patches = pixel_values.size(0)
        if patches == 0:
            return pixel_values.new_zeros(0, vc.hidden_size)
        frames = frame_grids(grids.cpu())
        weight = self.patch_embedding.weight
        embedded = F.linear(pixel_values.reshape(patches, -1).to(weight.dtype),
                            weight.reshape(weight.size(0), -1), self.patch_embedding.bias)
        hidden = embedded + self.absolute_positions(frames)
        rows, segments = self.rotary_angles(frames, device=hidden.device), self._segments(frames)
        pad = self._sequence_padding(patches)
        if pad:
            hidden = F.pad(hidden, (0, 0, 0, pad))
            rows = F.pad(rows, (0, 0, 0, pad))
            segments = F.pad(segments, (0, pad), value=len(frames))
        rotary = RotaryTables(cos=torch.cos(rows)[:, None, None, :],
                              sin=torch.sin(rows)[:, None, None, :])
        hidden = hidden.unsqueeze(1)  # [s, b=1, hidden]
        if self.config.sequence_parallel:
            hidden = scatter_to_sequence_parallel_region(hidden)
        hidden = self.encoder(
            hidden_states=hidden,
            attention_mask=None,
            packed_seq_params=AttentionInputs(rotary=rotary,
                                              segments=segments.to(hidden.device)[None]),
        )
        if self.config.sequence_parallel:
            # Downstream consumers (the projector) use the full features on every TP rank, so
            # the gradient arriving here is already complete: the backward only splits it.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden[:patches, 0]

    def absolute_positions(self, frames: list[tuple[int, int]]) -> torch.Tensor:
        """[P, hidden]: the learned table interpolated to each frame's grid, in raster order."""
        side = self.vision_config.position_grid
        table = self.position_embedding.weight
        grid = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0)  # [1, hidden, G, G]
        cache: dict[tuple[int, int], torch.Tensor] = {}
        rows = []
        for h, w in frames:
            if (h, w) not in cache:
                if (h, w) == (side, side):
                    cache[h, w] = table
                else:
                    resized = F.interpolate(grid, size=(h, w), mode="bilinear",
                                            align_corners=False)
                    cache[h, w] = resized[0].flatten(1).transpose(0, 1)
            rows.append(cache[h, w])
        return torch.cat(rows)

    def rotary_angles(self, frames: list[tuple[int, int]], *, device) -> torch.Tensor:
        """[P, head_dim / 2] fp32 angles: height frequencies × row, then width × column."""
        rows, cols = [], []
        for h, w in frames:
            index = torch.arange(h * w, device=device)
            rows.append(index // w)
            cols.append(index % w)
        inv_freq = self.inv_freq.to(device)
        hid = torch.cat(rows).float()[:, None] * inv_freq
        wid = torch.cat(cols).float()[:, None] * inv_freq
        return torch.cat([hid, wid], dim=-1)

    @staticmethod
    def _segments(frames: list[tuple[int, int]]) -> torch.Tensor:
        """[P] frame index of every patch (attention stays inside a frame)."""
        sizes = torch.tensor([h * w for h, w in frames])
        return torch.repeat_interleave(torch.arange(len(frames)), sizes)

    def _sequence_padding(self, patches: int) -> int:
        if not self.config.sequence_parallel:
            return 0
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return -patches % tp
