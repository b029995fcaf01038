"""A key/value cache for incremental decoding, held by our CoreAttention (generation only).

Why here and not megatron-core's `inference_context`: megatron-core's `SelfAttention` caches keys
in `_adjust_key_value_for_inference` *before* rotary embedding, and expects to rotate the whole
cached prefix with its own per-layer tables. Our decoder applies RoPE (M-RoPE tables from
`AttentionInputs.rotary`) inside `CoreAttention`, so the keys megatron-core would cache are
unrotated and it would never rotate them. Instead `CoreAttention` stores keys *after* rotation:
a decode step passes the rotary tables of its new positions only (the model computes them from
the position ids it is given), rotates the new query/key, appends the key/value here, and
attends over everything cached so far. Cached keys never need re-rotation, which also makes
M-RoPE trivial: a generated token's (t, h, w) ids continue after the prompt's largest id.

One `KVCache` serves every decoder layer of one rank (keyed by `layer_number`, so each pipeline
stage holds only its own layers) for one batch of rows. Rows are left-padded to a common prompt
length; `key_valid` [b, capacity] marks the slots that hold real tokens, so padding is never
attended to (a padding query sees itself only, which keeps its softmax finite; its output is
never used). Slot j of every row is filled by the same forward pass, so one `length` counter
serves the whole batch; `advance` moves it after each forward pass of the stage.

Training never sets a cache: `CoreAttention.kv_cache` defaults to None and its forward is
unchanged then. `attached` installs the cache on the decoder layers of model chunks for the
duration of a generation (the vision tower's attention is left alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


class KVCache:
    """Rotated keys and values [b, kv_heads, capacity, d] per decoder layer of this rank."""

    def __init__(self, *, key_valid: torch.Tensor):
        if key_valid.dim() != 2 or key_valid.dtype != torch.bool:
            raise ValueError(f"KVCache: key_valid must be a bool [batch, capacity] tensor, got "
                             f"{key_valid.dtype} {tuple(key_valid.shape)}")
        self.key_valid = key_valid
        self.batch, self.capacity = key_valid.shape
        self.length = 0  # slots filled by completed forward passes
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # The additive mask of the current pass, built by its first layer and reused by the
        # others (key: slots, device, dtype).
        self._mask_key: tuple | None = None
        self._mask: torch.Tensor | None = None

    def advance(self, count: int) -> None:
        """Mark `count` more slots as filled (after every layer of the stage has written them)."""
        if self.length + count > self.capacity:
            raise ValueError(f"KVCache: {self.length} + {count} tokens exceed its capacity "
                             f"{self.capacity}")
        self.length += count

    def attend(self, layer_number: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float) -> torch.Tensor:
        """Append this pass's rotated k/v [b, g, n, d] and attend q [b, h, n, d] over the cache.

        Query i sits in slot `length + i` and sees slots up to its own (causal), except
        padding slots. Returns [b, h, n, d].
        """
        b, groups, n, dim = k.shape
        if b != self.batch:
            raise ValueError(f"KVCache: built for {self.batch} rows, got {b}")
        start, stop = self.length, self.length + n
        if stop > self.capacity:
            raise ValueError(f"KVCache: {stop} tokens exceed its capacity {self.capacity}")
        if layer_number not in self._layers:
            shape = (b, groups, self.capacity, dim)
            self._layers[layer_number] = (k.new_zeros(shape), v.new_zeros(shape))
        keys, values = self._layers[layer_number]
        keys[:, :, start:stop] = k
        values[:, :, start:stop] = v
        return F.scaled_dot_product_attention(
            q, keys[:, :, :stop], values[:, :, :stop],
            attn_mask=self._additive_mask(start, stop, device=q.device, dtype=q.dtype),
            scale=scale, enable_gqa=groups != q.size(1),
        )

    def _additive_mask(self, start: int, stop: int, *, device, dtype) -> torch.Tensor:
        """[b, 1, n, stop]: 0 where a query may attend, -inf elsewhere (built once per pass).

        A query sees the slots up to its own (causal), except padding slots; a padding query
        sees itself, so no row of the softmax is empty."""
        key = (start, stop, device, dtype)
        if self._mask_key != key:
            query_slots = torch.arange(start, stop, device=device).view(-1, 1)
            key_slots = torch.arange(stop, device=device).view(1, -1)
            causal = key_slots <= query_slots  # [n, stop]
            own = key_slots == query_slots
            valid = self.key_valid[:, :stop].to(device).view(self.batch, 1, 1, stop)
            allowed = causal & (valid | own)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            self._mask = mask.masked_fill_(~allowed, float("-inf"))
            self._mask_key = key
        return self._mask


def decoder_core_attentions(chunk) -> list:
    """The core-attention modules of a model chunk's decoder layers (not the vision tower's)."""
    module = chunk.module if hasattr(chunk, "module") else chunk
    return [layer.self_attention.core_attention for layer in module.decoder.layers]


@contextlib.contextmanager
def attached(chunks: list, cache: KVCache) -> Iterator[KVCache]:
    """Install `cache` on every decoder core attention of `chunks` for the `with` block."""
    modules = [m for chunk in chunks for m in decoder_core_attentions(chunk)]
    for module in modules:
        # Our CoreAttention declares `kv_cache` (None until set here); TE's does not.
        if not hasattr(module, "kv_cache"):
            raise ValueError(
                f"model.attention_backend: generation with a KV cache needs our core attention, "
                f"but the decoder uses {type(module).__name__}; build the model with "
                f"attention_backend=auto|sdpa|flash (checkpoints load into any of them)"
            )
    try:
        for module in modules:
            module.kv_cache = cache
        yield cache
    finally:
        for module in modules:
            module.kv_cache = None
