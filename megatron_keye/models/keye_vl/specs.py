"""ModuleSpecs for the Qwen3 decoder layer: local (pure torch, any device) and TransformerEngine.

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
from megatron_keye.ops.norm import RMSNorm
from megatron_keye.ops.swiglu import SwiGLU

# The local spec's norm parameters use TE's fused-linear names in checkpoints.
_TE_COMPATIBLE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def local_layer_spec(*, attention_backend: str = "sdpa") -> ModuleSpec:
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
                    core_attention=functools.partial(CoreAttention, backend=attention_backend),
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


def te_layer_spec() -> ModuleSpec:
    """The same layer on TransformerEngine kernels (GPU clusters; imported lazily)."""
    try:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    except (ImportError, AssertionError) as err:
        raise ImportError(
            "model.attention_backend='te' needs TransformerEngine (pip install megatron-keye[gpu])"
        ) from err


def decoder_block_spec(
    config: TransformerConfig, *, attention_backend: str, vp_stage: int | None
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    if attention_backend == "te":
        layer, final_norm = te_layer_spec(), _te_norm()
    else:
        layer, final_norm = local_layer_spec(attention_backend=attention_backend), RMSNorm
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=final_norm)


def layer_offset(config: TransformerConfig, vp_stage: int | None) -> int:
    """Global index of this stage's first layer."""
    return get_transformer_layer_offset(config, vp_stage=vp_stage)


def _te_norm():
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm
