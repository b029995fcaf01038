"""Parameter counts of the Qwen3 decoder, split the way the planner places them on ranks."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_keye.config.flavors import flavor_fields
from megatron_keye.config.schema import ModelConfig
from megatron_keye.runtime.metrics import flops_per_token, matmul_params


def model_config(flavor: str, **overrides) -> ModelConfig:
    """A `ModelConfig` of a named flavor (tiny | small | 0.6b | 8b) with field overrides."""
    fields = flavor_fields(flavor)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(flavor=flavor, **fields)


@dataclass(kw_only=True, frozen=True)
class ModelShape:
    """Parameter counts per part (elements), from a `ModelConfig`.

    `layer` holds one decoder layer's matmul weights (tensor-parallel sharded) and `layer_norms`
    its norm scales (replicated over TP); `embedding` and `output` are the padded-vocabulary
    matrices on the first and last pipeline stage (`output` is 0 when tied and PP = 1: the
    single stage holds one matrix; with PP > 1 the last stage keeps a tied copy).
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int
    tied: bool
    layer: int
    layer_norms: int
    embedding: int
    output: int
    final_norm: int
    matmul_params: int  # runtime.metrics.matmul_params: the N of 6N

    @classmethod
    def of(cls, model: ModelConfig) -> ModelShape:
        h, d = model.hidden_size, model.head_dim
        q, kv = model.num_attention_heads * d, model.num_query_groups * d
        layer = h * (q + 2 * kv) + q * h + 3 * h * model.ffn_hidden_size
        vocab_matrix = model.padded_vocab_size * h
        return cls(
            hidden=h,
            layers=model.num_layers,
            heads=model.num_attention_heads,
            kv_heads=model.num_query_groups,
            head_dim=d,
            ffn=model.ffn_hidden_size,
            vocab=model.vocab_size,
            padded_vocab=model.padded_vocab_size,
            tied=model.tie_word_embeddings,
            layer=layer,
            layer_norms=2 * h + 2 * d,  # input/pre-MLP RMSNorm + q/k RMSNorm scales
            embedding=vocab_matrix,
            output=vocab_matrix,
            final_norm=h,
            matmul_params=matmul_params(model),
        )

    @property
    def total_params(self) -> int:
        """Every parameter of the model once (a tied matrix counted once)."""
        head = 0 if self.tied else self.output
        return self.layers * (self.layer + self.layer_norms) + self.embedding + head + self.final_norm


def model_flops_per_token(model: ModelConfig, seq_length: int) -> dict[str, float]:
    """FLOPs per trained token: 6N (dense) and 6·L·S·heads·head_dim (causal attention), as
    `runtime.metrics.flops_per_token` counts them (it is the total)."""
    total = flops_per_token(model, seq_length)
    dense = 6.0 * matmul_params(model)
    return {"dense": dense, "attention": total - dense, "total": total}
