"""One decode step (one new token per row) over a model chunk's own weights, without the module
wrappers of megatron-core's layers.

Why: a decode step multiplies [1, b, h] activations, so on CPUs (and in kernel-launch-bound GPU
decoding) the time goes less into the matmuls than into the Python around them: megatron-core's
layer, attention, MLP and parallel-linear modules each check configuration, dispatch through
autograd functions and hooks, on every token of every layer. This step runs the same arithmetic
straight from the parameters — the same norms (their modules' own forward), the same fused
QKV/FC1 matmuls against the same weights, the same query-group split, our core attention with
its KV cache, the same tensor-parallel all-reduces and residual additions in megatron-core's
order — so its outputs are bit-identical to the module path (`tests/distributed/
test_generation.py` checks tokens and log-probs at TP=1, TP=2 and PP=2).

Prefill (the whole prompt, images and videos included) always runs the modules. A layer this
step does not cover (linear biases, MoE, gated attention output, fewer query groups than TP
ranks, fp32 residuals, TransformerEngine modules, sequence parallelism, ...) makes `unsupported`
return the reason, and generation then runs the modules for every step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from megatron_keye.ops.attention.core import CoreAttention
from megatron_keye.ops.attention.inputs import AttentionInputs
from megatron_keye.ops.attention.rope import RotaryTables
from megatron_keye.ops.norm import RMSNorm
from megatron_keye.ops.swiglu import SwiGLU


def unsupported(module) -> str | None:
    """Why `module`'s decoder layers cannot take the lean step (None when they can)."""
    config = module.config
    if config.fp32_residual_connection or config.apply_residual_connection_post_layernorm:
        return "residual connection variant"
    if config.attention_output_gate or config.no_rope_freq:
        return "gated attention output / layers without RoPE"
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config.num_query_groups < tp:
        return "fewer query groups than tensor-parallel ranks"
    for layer in module.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        norms = (layer.input_layernorm, layer.pre_mlp_layernorm, attention.q_layernorm,
                 attention.k_layernorm)
        if not all(isinstance(n, RMSNorm | type(None)) for n in norms):
            return "norms other than our RMSNorm"
        if not isinstance(attention.core_attention, CoreAttention):
            return "a core attention other than ours"
        if not isinstance(layer.cross_attention, IdentityOp):
            return "cross-attention"
        if not hasattr(mlp, "linear_fc1") or not isinstance(mlp.activation_func, SwiGLU):
            return "an MLP other than linear_fc1 -> SwiGLU -> linear_fc2"
        for linear, kind in ((attention.linear_qkv, ColumnParallelLinear),
                             (attention.linear_proj, RowParallelLinear),
                             (mlp.linear_fc1, ColumnParallelLinear),
                             (mlp.linear_fc2, RowParallelLinear)):
            if type(linear) is not kind:
                return f"{type(linear).__name__} where megatron-core's {kind.__name__} was expected"
            if linear.bias is not None:
                return "linear biases"
            if getattr(linear, "gather_output", False) or getattr(linear, "sequence_parallel",
                                                                  False):
                return "gathered or sequence-parallel linear outputs"
    return None


class LeanDecoder:
    """The decoder layers of one model chunk as plain tensor code for one-token steps."""

    def __init__(self, module):
        self.module = module
        self.layers = list(module.decoder.layers)
        self.final_norm = module.decoder.final_layernorm if module.post_process else None
        group = parallel_state.get_tensor_model_parallel_group()
        self.tp_group = group if dist.get_world_size(group) > 1 else None

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """hidden [1, b, h] -> this chunk's output: hidden [1, b, h], or on the last stage
        the vocab-parallel logits [b, V/tp] of the new position."""
        tables = RotaryTables.from_angles(self.module.rotary_pos_emb(position_ids))
        inputs = AttentionInputs(rotary=tables)
        for layer in self.layers:
            hidden = self._layer(layer, hidden, inputs)
        if self.final_norm is None:
            return hidden
        hidden = self.final_norm(hidden)
        return self.module.logits_from_hidden(hidden)[-1]

    def _layer(self, layer, hidden: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        attention, mlp = layer.self_attention, layer.mlp
        # attention: norm -> QKV -> per-group split -> q/k norms -> core attention -> proj
        x = layer.input_layernorm(hidden)
        qkv = _linear(x, attention.linear_qkv)
        groups = attention.num_query_groups_per_partition
        per_group = attention.num_attention_heads_per_partition // groups
        dim = attention.hidden_size_per_attention_head
        qkv = qkv.view(*qkv.shape[:-1], groups, (per_group + 2) * dim)
        query, key, value = torch.split(qkv, [per_group * dim, dim, dim], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, dim)
        if attention.q_layernorm is not None:
            query = attention.q_layernorm(query)
        if attention.k_layernorm is not None:
            key = attention.k_layernorm(key)
        context = attention.core_attention(query, key, value, None, packed_seq_params=inputs)
        hidden = hidden + self._row_parallel(context, attention.linear_proj)
        # MLP: norm -> FC1 -> SwiGLU -> FC2
        x = layer.pre_mlp_layernorm(hidden)
        # the [gate | up] halves as two products: at one token per row a matmul reads its whole
        # weight, and two half-size weights stay in cache better than one (same dot products)
        gate_weight, up_weight = mlp.linear_fc1.weight.chunk(2, dim=0)
        gate, up = torch.matmul(x, gate_weight.t()), torch.matmul(x, up_weight.t())
        return hidden + self._row_parallel(F.silu(gate) * up, mlp.linear_fc2)

    def _row_parallel(self, x: torch.Tensor, linear) -> torch.Tensor:
        """A row-parallel linear: the partial products summed over the TP ranks."""
        out = torch.matmul(x, linear.weight.t())
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out


def _linear(x: torch.Tensor, linear) -> torch.Tensor:
    """A column-parallel linear's local output columns (its input is the same on every TP rank)."""
    return torch.matmul(x, linear.weight.t())
