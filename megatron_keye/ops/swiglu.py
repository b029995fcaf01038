"""SwiGLU activation, silu(gate) * up over the [gate | up] halves of linear_fc1's output.

Plugged into megatron-core's MLP through `MLPSubmodules.activation_func` (built when
`TransformerConfig.use_te_activation_func` is set, which is megatron's hook for an activation
module from the spec). Its backward writes both halves of the input gradient in place, where
megatron's `torch.chunk` version concatenates them (a strided copy of the largest activation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        grad_gate.copy_(torch.ops.aten.silu_backward(grad * up, gate))
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :F]) * x[..., F:] for x of width 2F."""
    return _SwiGLUFunction.apply(x)


class SwiGLU(MegatronModule):
    """The activation module for megatron-core's MLP spec (no parameters)."""

    def __init__(self, config):
        super().__init__(config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)
