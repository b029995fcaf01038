"""ModuleSpecs for the Qwen3 decoder layer and the ViT layer: local (pure torch, any device) and
TransformerEngine.

Both specs produce the same parameter names in checkpoints: the local spec maps its norms onto
TE's fused-norm names (`self_attention.linear_qkv.layer_norm_weight`), so a checkpoint written
on a laptop loads on a TE cluster and back.
"""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import ModuleSpec, TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_keye.ops.attention.core import CoreAttention
from megatron_keye.ops.norm import LayerNorm, RMSNorm
from megatron_keye.ops.swiglu import SwiGLU

# The local spec's norm parameters use TE's fused-linear names in checkpoints.
_TE_COMPATIBLE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def local_layer_spec(*, attention_backend: str = "sdpa", cp_comm: str = "p2p",
                     cp_a2a_size: int = 1) -> ModuleSpec:
    """A Qwen3 layer from megatron-core TP layers, our RMSNorm, SwiGLU and core attention.

    The SwiGLU module is used when the TransformerConfig sets `use_te_activation_func`
    (megatron-core's switch for taking the activation from the spec).
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=functools.partial(
                        CoreAttention, backend=attention_backend, cp_comm=cp_comm,
                        cp_a2a_size=cp_a2a_size,
                    ),
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm,
                    k_layernorm=RMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear,
                    activation_func=SwiGLU,
                    linear_fc2=RowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_TE_COMPATIBLE_KEYS),
        ),
    )


def uses_spec_activation(attention_backend: str) -> bool:
    """The value `TransformerConfig.use_te_activation_func` must have for this backend's spec.

    With the switch on, megatron-core 0.16.1's MLP applies the spec's `activation_func` module
    to the whole [gate | up] output of linear_fc1, and, when the spec has none, the config's
    plain `activation_func` (transformer/mlp.py:136 and :163): SiLU over both halves, twice the
    width linear_fc2 takes. With it off, the MLP does the gated SiLU itself (its `glu`).
    - local spec: our SwiGLU module is the activation, so the switch is on;
    - TE spec: megatron-core's own Qwen3/GPT layer (`get_gpt_layer_with_transformer_engine_spec`
      with QK-norm and its default `use_te_activation_func=False`) has no activation module, so
      the switch is off and the MLP computes silu(gate) * up.
    """
    return attention_backend != "te"


def te_layer_spec() -> ModuleSpec:
    """The same layer on TransformerEngine kernels: megatron-core's own GPT/Qwen3 TE layer spec
    with QK RMSNorm (GPU clusters; imported lazily)."""
    specs = _mcore_te_specs()
    return specs.get_gpt_layer_with_transformer_engine_spec(
        qk_layernorm=True, use_te_activation_func=uses_spec_activation("te")
    )


def decoder_block_spec(
    config: TransformerConfig, *, attention_backend: str, vp_stage: int | None,
    cp_comm: str = "p2p", cp_a2a_size: int = 1,
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    wanted = uses_spec_activation(attention_backend)
    if config.use_te_activation_func != wanted:
        raise ValueError(
            f"TransformerConfig.use_te_activation_func={config.use_te_activation_func} does not "
            f"fit the {attention_backend!r} layer spec (needs {wanted}): megatron-core's MLP "
            f"would apply the wrong activation to linear_fc1's [gate | up] output"
        )
    if attention_backend == "te":
        layer, final_norm = te_layer_spec(), _mcore_te_specs().TENorm
    else:
        layer = local_layer_spec(attention_backend=attention_backend, cp_comm=cp_comm,
                                 cp_a2a_size=cp_a2a_size)
        final_norm = RMSNorm
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=final_norm)


def layer_offset(config: TransformerConfig, vp_stage: int | None) -> int:
    """Global index of this stage's first layer."""
    return get_transformer_layer_offset(config, vp_stage=vp_stage)


def _mcore_te_specs():
    """megatron-core's GPT layer-spec module, refusing when TransformerEngine is missing."""
    from megatron.core.models.gpt import gpt_layer_specs

    if not gpt_layer_specs.HAVE_TE:
        raise ImportError(
            "model.attention_backend='te' needs TransformerEngine (pip install megatron-keye[gpu])"
        )
    return gpt_layer_specs


# --- the vision tower (SigLIP-style ViT) --------------------------------------------------------


def vision_local_layer_spec(*, attention_backend: str = "sdpa") -> ModuleSpec:
    """A pre-LN ViT layer from megatron-core TP layers, our LayerNorm and core attention.

    Bidirectional attention (no mask type); packed images/frames reach the core attention as
    segments, which it handles without a row-wide mask. The MLP is linear_fc1 → the config's
    activation (gelu tanh) → linear_fc2, all linears with biases.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=functools.partial(CoreAttention, backend=attention_backend),
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_TE_COMPATIBLE_KEYS),
        ),
    )


def vision_te_layer_spec() -> ModuleSpec:
    """The same ViT layer on TransformerEngine linears (norms fused into qkv and fc1), keeping
    our core attention for the 2D RoPE and per-frame varlen attention (GPU clusters)."""
    _mcore_te_specs()  # refuses clearly without TransformerEngine
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=functools.partial(CoreAttention, backend="auto"),
                    linear_proj=TERowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def vision_block_spec(config: TransformerConfig, *, attention_backend: str
                      ) -> TransformerBlockSubmodules:
    """Every ViT layer (the tower lives whole on the first pipeline stage) plus post-layernorm."""
    if attention_backend == "te":
        layer, final_norm = vision_te_layer_spec(), _mcore_te_specs().TENorm
    else:
        layer, final_norm = vision_local_layer_spec(attention_backend=attention_backend), LayerNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers,
                                      layer_norm=final_norm)
