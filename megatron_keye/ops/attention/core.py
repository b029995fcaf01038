"""Core attention: the one module where attention math lives.

It plugs into megatron-core's `SelfAttention` as the `core_attention` submodule of a layer spec,
taking query [sq, b, heads, d] and key/value [sk, b, groups, d] (tensor-parallel-local heads)
and returning [sq, b, heads * d]. Rotary embedding is applied here, from tables computed once
per forward pass (`AttentionInputs.rotary`), fused with the layout change the kernel wants.
Backends are chosen by config: `sdpa` (torch's scaled_dot_product_attention, every device) and,
on GPUs, `flash` (flash-attn). Packed samples (`AttentionInputs.segments`) never attend across a
boundary. Context parallelism will wrap these kernels here.

Generation sets `kv_cache` (a `kv_cache.KVCache`, see that module for why the cache lives here
and holds rotated keys): the new tokens' rotated keys/values are appended to it and the queries
attend over the whole cached prefix. It is None in training, which leaves forward unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_keye.ops.attention.inputs import AttentionInputs
from megatron_keye.ops.attention.kv_cache import KVCache
from megatron_keye.ops.attention.masks import segment_ids_from_cu_seqlens, segment_mask
from megatron_keye.ops.attention.rope import rotate_to_bhsd

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash")
# flash-attn's kernels take half precision only.
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_NOTICES_GIVEN: set[str] = set()


def resolve_backend(name: str, *, dtype: torch.dtype) -> str:
    """The kernel for `model.attention_backend` with parameters (and activations) of `dtype`.

    `auto` → flash-attn on CUDA when it is importable and `dtype` is fp16/bf16, else SDPA (an
    fp32 run on a flash-attn machine says once per process that it uses SDPA). An explicit
    `flash` with another dtype is refused.
    """
    if name == "auto":
        if not torch.cuda.is_available() or not _flash_attn_importable():
            return "sdpa"
        if dtype not in FLASH_DTYPES:
            _notice_once(
                "auto-fp32",
                f"model.attention_backend=auto: flash-attn takes fp16/bf16 only, so this "
                f"{_dtype_name(dtype)} run uses SDPA",
            )
            return "sdpa"
        return "flash"
    if name not in BACKENDS:
        raise ValueError(
            f"model.attention_backend: {name!r} is not a core-attention backend; "
            f"use auto|{'|'.join(BACKENDS)} (or 'te' for the TransformerEngine layer spec)"
        )
    if name == "flash" and dtype not in FLASH_DTYPES:
        raise ValueError(
            f"model.attention_backend: 'flash' takes fp16/bf16 only, but parameters are "
            f"{_dtype_name(dtype)}; set precision=bf16 or use 'sdpa'/'auto'"
        )
    return name


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _notice_once(key: str, message: str) -> None:
    if key not in _NOTICES_GIVEN:
        _NOTICES_GIVEN.add(key)
        log.warning(message)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CoreAttention(MegatronModule):
    """Softmax(QK^T * scale + mask) V over tensor-parallel-local heads, GQA aware."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        backend: str = "sdpa",
        cp_comm: str = "p2p",
        cp_a2a_size: int = 1,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.backend = resolve_backend(backend, dtype=config.params_dtype)
        self.cp_comm, self.cp_a2a_size = cp_comm, cp_a2a_size
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        # Set only while generating (ops/attention/kv_cache.py::attached).
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by CoreAttention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        sq, b, heads, dim = query.shape
        rotary, segments, positions = None, None, None
        if isinstance(packed_seq_params, AttentionInputs):
            rotary, segments = packed_seq_params.rotary, packed_seq_params.segments
            positions = packed_seq_params.positions
        elif packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            segments = segment_ids_from_cu_seqlens(packed_seq_params.cu_seqlens_q, b, sq)
        # [s, b, h, d] -> [b, h, s, d], rotated when tables are given.
        if rotary is not None:
            q, k = rotate_to_bhsd(query, rotary), rotate_to_bhsd(key, rotary)
        else:
            q, k = query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if self.kv_cache is not None:
            out = self.kv_cache.attend(self.layer_number, q, k, v, scale=self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
        dropout = self.dropout if self.training else 0.0
        # Dropout masks differ per tensor-parallel rank (they hold different heads).
        rng = get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext()
        with rng:
            if positions is not None:  # context parallel: this rank holds zig-zag chunks
                if dropout > 0:
                    raise NotImplementedError("attention dropout under context parallelism")
                from megatron.core import parallel_state

                from megatron_keye.ops.attention.context_parallel import (
                    context_parallel_attention,
                )

                out = context_parallel_attention(
                    q, k, v, causal=causal, scale=self.softmax_scale, positions=positions,
                    segments=segments, group=parallel_state.get_context_parallel_group(),
                    comm=self.cp_comm, a2a_size=self.cp_a2a_size,
                )
            elif self.backend == "flash":
                from megatron_keye.ops.attention.flash import flash_attention

                out = flash_attention(q, k, v, causal=causal, segments=segments,
                                      scale=self.softmax_scale, dropout=dropout)
            elif segments is not None and not causal:
                # Bidirectional packed sequences (ViT images/frames): per-sequence SDPA calls
                # grouped by length, never a mask over the whole row.
                from megatron_keye.ops.attention.varlen import varlen_sdpa

                out = varlen_sdpa(q, k, v, segments=segments, causal=False,
                                  scale=self.softmax_scale, dropout=dropout)
            else:
                out = sdpa_attention(q, k, v, causal=causal, segments=segments,
                                     mask=attention_mask, scale=self.softmax_scale,
                                     dropout=dropout)
        # [b, h, s, d] -> [s, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    segments: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention with torch SDPA on [b, h, s, d] tensors (K/V may have fewer heads: GQA).

    `segments` [b, s] (sample id per token) restricts attention to the token's own sample;
    `mask` is megatron's boolean mask where True means "do not attend".
    """
    gqa = k.size(1) != q.size(1)
    allowed = None
    if segments is not None:
        allowed = segment_mask(segments, causal=causal)
    elif mask is not None:
        allowed = ~mask
    if allowed is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                              scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout,
                                          scale=scale, enable_gqa=gqa)
