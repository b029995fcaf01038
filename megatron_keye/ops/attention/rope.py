"""Rotary embedding applied inside core attention, fused with the layout change SDPA wants.

`RotaryTables` holds cos/sin of the angles of this rank's tokens, computed once per forward pass
(not per layer) from position ids of any shape of origin: 1D text, M-RoPE (t, h, w) or the ViT's
2D (h, w). `rotate_to_bhsd` turns [s, b, h, d] into rotated [b, h, s, d] in one pass; its backward
writes both halves in place (no concatenation), in the rotate-half convention
(pairs are i and i + d/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RotaryTables:
    """cos and sin of the rotary angles, each [s, b, 1, d/2]."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def from_angles(cls, angles: torch.Tensor) -> RotaryTables:
        """From megatron-layout angles [s, b, 1, d] whose two halves are equal."""
        half = angles[..., : angles.size(-1) // 2]
        return cls(cos=torch.cos(half).contiguous(), sin=torch.sin(half).contiguous())


def _rotated_bhsd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    s, b, h, d = x.shape
    half = d // 2
    out = x.new_empty(b, h, s, d)
    view = out.permute(2, 0, 1, 3)
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = view[..., :half], view[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _RotateToBHSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        ctx.save_for_backward(cos, sin)
        return _rotated_bhsd(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = grad.permute(2, 0, 1, 3)  # [s, b, h, d]
        half = g.size(-1) // 2
        g1, g2 = g[..., :half], g[..., half:]
        grad_x = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        gx1, gx2 = grad_x[..., :half], grad_x[..., half:]
        torch.mul(g1, cos, out=gx1).addcmul_(g2, sin)
        torch.mul(g2, cos, out=gx2).addcmul_(g1, sin, value=-1)
        return grad_x, None, None


def rotate_to_bhsd(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotated copy of x [s, b, h, d] laid out as [b, h, s, d]."""
    if not torch.is_grad_enabled():  # generation: the same arithmetic, no autograd node
        return _rotated_bhsd(x, tables.cos.to(x.dtype), tables.sin.to(x.dtype))
    return _RotateToBHSD.apply(x, tables.cos, tables.sin)


def reference_rotate(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Unfused rotate-half RoPE on [s, b, h, d] (for tests)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = tables.cos, tables.sin
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
