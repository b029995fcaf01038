"""flash-attn's block kernels for context-parallel attention on GPUs (imported lazily).

The ring needs what flash-attn's public functions hide: a block's log-sum-exp from the forward,
and a backward that takes the MERGED output and log-sum-exp of all blocks. Those are the
interface-level `_flash_attn_forward` / `_flash_attn_backward` of `flash_attn.flash_attn_interface`,
whose arguments changed across 2.x releases (one `window_size` pair, later `window_size_left` /
`window_size_right` and `softcap`; a forward returning 8 values, later 4). The adapter binds
arguments by name from the installed function's signature, so either generation works, and
takes the same [b, h, s, d] tensors as `local_kernels` (GQA native, no head expansion).

Used only where it is exact and supported: CUDA tensors in fp16/bf16 with a head size that is a
multiple of 8; everything else goes to the masked kernel.
"""

from __future__ import annotations

import functools
import inspect

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _interface():
    """flash_attn.flash_attn_interface, or None where flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface


def usable(q: torch.Tensor) -> bool:
    """Whether flash-attn's block kernels take this rank's queries."""
    return (q.device.type == "cuda" and q.dtype in HALF_DTYPES and q.size(-1) % 8 == 0
            and _interface() is not None)


def _call(fn, **arguments):
    """Call `fn` with the arguments its signature names (no sliding window, no softcap)."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        arguments["window_size"] = (-1, -1)
    else:
        arguments.update(window_size_left=-1, window_size_right=-1)
    arguments.update(softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None,
                     return_softmax=False)
    return fn(**{name: value for name, value in arguments.items() if name in params})


def _bshd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, h, sq, d], lse [b, h, sq] fp32) of q against the whole block; causal = query i
    sees keys 0..i (sq == sk)."""
    result = _call(_interface()._flash_attn_forward, q=_bshd(q), k=_bshd(k), v=_bshd(v),
                   dropout_p=0.0, softmax_scale=scale, causal=causal)
    out, lse = (result[0], result[1]) if len(result) == 4 else (result[0], result[5])
    return out.transpose(1, 2), lse.float().contiguous()


def block_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float):
    """(dq, dk, dv) in [b, h|kv, s, d] of this block given the merged output and lse."""
    q_, k_, v_ = _bshd(q), _bshd(k), _bshd(v)
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    _call(_interface()._flash_attn_backward, dout=_bshd(grad_out.to(q.dtype)), q=q_, k=k_, v=v_,
          out=_bshd(out.to(q.dtype)), softmax_lse=lse.float().contiguous(), dq=dq, dk=dk, dv=dv,
          dropout_p=0.0, softmax_scale=scale, causal=causal)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
