"""RMSNorm for megatron-core layer specs, sequence-parallel aware.

megatron-core's local-spec norm refuses sequence parallelism (transformer/torch_norm.py:32). This
one allows it: under sequence parallelism each tensor-parallel rank normalizes a different slice
of the sequence, so its weight is tagged `sequence_parallel` and `finalize_model_grads` sums the
weight's gradient over the tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 like Qwen3's reference norm."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class LayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm (weight and bias) built from a megatron-core config, sequence-parallel
    aware like `RMSNorm` above: under sequence parallelism both parameters are tagged so
    `finalize_model_grads` sums their gradients over the tensor-parallel group."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True
            self.bias.sequence_parallel = True
