"""Multimodal rotary position embedding (M-RoPE) for the Qwen3 decoder.

Position ids are always [3, b, s] (t, h, w). The rotary half-dimension is split into sections
(e.g. [16, 24, 24] for head_dim 128): frequency i rotates by the t, h or w id according to the
section it falls in. A text-only batch carries equal t/h/w ids, which reduces exactly to 1D RoPE.

Frequencies are computed from the position ids of the tokens this rank holds, so the same module
serves packed samples (ids restart per sample) and context-parallel chunks without slicing.
"""

from __future__ import annotations

import torch


class MultimodalRotaryEmbedding(torch.nn.Module):
    """Maps position ids [3, b, s] to rotary angles [s, b, 1, head_dim] (megatron's layout)."""

    def __init__(self, *, head_dim: int, base: float, sections: list[int]):
        super().__init__()
        if sum(sections) != head_dim // 2:
            raise ValueError(
                f"model.mrope_section {sections} must sum to head_dim/2 = {head_dim // 2}"
            )
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (base**exponents), persistent=False)
        axis = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sections)])
        self.register_buffer("axis_of_freq", axis, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.dim() != 3 or position_ids.size(0) != 3:
            raise ValueError(
                f"position_ids must be [3, batch, seq] (t, h, w), got {tuple(position_ids.shape)}"
            )
        # angles[a, b, s, i] = pos[a, b, s] * inv_freq[i]; pick axis a = axis_of_freq[i].
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq
        index = self.axis_of_freq.view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        half = angles.gather(0, index).squeeze(0)  # [b, s, head_dim/2]
        full = torch.cat((half, half), dim=-1)  # rotate-half layout
        return full.transpose(0, 1).unsqueeze(2).contiguous()


def text_position_ids(batch: int, seq: int, *, device=None) -> torch.Tensor:
    """Equal t/h/w ids 0..seq-1 for a text-only batch: [3, batch, seq]."""
    ids = torch.arange(seq, device=device)
    return ids.view(1, 1, seq).expand(3, batch, seq).contiguous()


def packed_text_position_ids(sample_ids: torch.Tensor) -> torch.Tensor:
    """[3, b, s] text position ids that restart at 0 with every sample of a packed row.

    `sample_ids` [b, s] holds one id per token; a sample is a run of equal ids.
    """
    rows, seq = sample_ids.shape
    index = torch.arange(seq, device=sample_ids.device).expand(rows, seq)
    starts = torch.ones_like(sample_ids, dtype=torch.bool)
    starts[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    ids = index - first
    return ids.unsqueeze(0).expand(3, rows, seq).contiguous()
