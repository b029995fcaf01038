"""Per-forward inputs for CoreAttention, carried through megatron-core's layers untouched.

megatron-core hands `packed_seq_params` from the model's forward down to every core-attention
call without inspecting it unless `qkv_format == "thd"`. `AttentionInputs` rides that channel:
the rotary tables of this rank's tokens and, for packed sequences, the sample id of every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_keye.mcore_version import require_supported_mcore
from megatron_keye.ops.attention.rope import RotaryTables

require_supported_mcore("AttentionInputs (a PackedSeqParams subclass, ops/attention/inputs.py)")


@dataclass(kw_only=True)
class AttentionInputs(PackedSeqParams):
    """What CoreAttention needs beyond q, k, v; `qkv_format` stays "sbhd"."""

    rotary: RotaryTables | None = None
    # [b, s] sample id per token when several samples share a row; None = one sample per row.
    segments: torch.Tensor | None = None
    # [b, s] position of each local token in its full row, under context parallelism (this
    # rank's zig-zag chunks); None without context parallelism.
    positions: torch.Tensor | None = None

    def __post_init__(self):
        self.qkv_format = "sbhd"
