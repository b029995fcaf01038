"""The Qwen3 decoder on megatron-core: embeddings, M-RoPE, TransformerBlock, vocab-parallel head.

One `Qwen3LanguageModel` is one pipeline (virtual) stage: the first stage embeds tokens (or takes
precomputed embeddings, e.g. with vision features merged in), the last produces vocab-parallel
logits [s, b, padded_vocab/tp] for a loss head. Tensor and sequence parallelism come from
megatron-core's layers; the attention kernel is our `CoreAttention`.

The embedding and output layer have `model.padded_vocab_size` rows (a multiple of
`model.make_vocab_size_divisible_by`, independent of TP, so checkpoints reshard). The logit columns
past `model.vocab_size` are set to the dtype's most negative value on the way out, so every
softmax over them (loss heads, log-probs, sampling) is exactly the unpadded model's: exp of those
columns is 0, and unlike -inf they never turn 0·log 0 into NaN.

With `model.output_head: value` (reward models) the output layer is replaced by `ValueHead`, a
replicated [1, h] projection, and the last stage returns one fp32 score per token [s, b].

With `model.tie_word_embeddings` the output layer reuses the embedding matrix (megatron-core's
shared embedding weight): on one pipeline stage it is the same parameter; under pipelining the
last stage holds a copy that starts equal (`setup_embeddings_and_output_layer` all-reduces it over
the embedding group) and stays equal because `finalize_model_grads` sums the two gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_keye.config.schema import ModelConfig, ParallelConfig
from megatron_keye.models.keye_vl.rope import MultimodalRotaryEmbedding
from megatron_keye.models.keye_vl.specs import decoder_block_spec, uses_spec_activation
from megatron_keye.ops.attention.core import resolve_backend
from megatron_keye.ops.attention.inputs import AttentionInputs
from megatron_keye.ops.attention.rope import RotaryTables


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    precision: str = "fp32",
    use_cpu_initialization: bool | None = None,
) -> TransformerConfig:
    """Translate our model and parallel sections into megatron-core's TransformerConfig."""
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=(
            parallel.virtual_pipeline if parallel.virtual_pipeline > 1 else None
        ),
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None
        else use_cpu_initialization,
        # Losses arrive as (sum, token count); gradients are scaled once by the global count.
        calculate_per_token_loss=True,
        # Interleaved pipelining with batched p2p is silently wrong (NVIDIA/Megatron-LM#1450).
        batch_p2p_comm=parallel.virtual_pipeline == 1,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        # Local spec: the activation is the spec's SwiGLU module (in-place backward). TE spec
        # (megatron-core's own): no activation module, the MLP's gated SiLU (specs.py says why).
        use_te_activation_func=uses_spec_activation(model.attention_backend),
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        **_recompute_fields(model.recompute),
    )


def _recompute_fields(recompute: str) -> dict:
    """megatron-core's activation-recompute settings for `model.recompute`."""
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    return {}


class Qwen3LanguageModel(LanguageModule):
    """One pipeline stage of the Qwen3 decoder (GQA, QK RMSNorm, SwiGLU, tied or untied)."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        model: ModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        parallel_output: bool = True,
        cp_comm: str = "p2p",
        cp_a2a_size: int = 1,
    ):
        super().__init__(config=config)
        self.model_config = model
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.parallel_output = parallel_output
        self.output_head = model.output_head
        # A value head has no vocabulary: nothing to tie the embedding to.
        self.share_embeddings_and_output_weights = (
            model.tie_word_embeddings and model.output_head == "lm"
        )
        self.model_type = ModelType.encoder_or_decoder
        self.vocab_size = model.vocab_size
        self.padded_vocab_size = model.padded_vocab_size
        backend = model.attention_backend if model.attention_backend == "te" else resolve_backend(
            model.attention_backend, dtype=config.params_dtype
        )
        # Our core attention applies RoPE itself (tables computed once per forward pass); the TE
        # spec's attention expects megatron's per-layer rotary embedding instead.
        self.rope_in_core_attention = backend != "te"
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=model.padded_vocab_size,
                max_sequence_length=model.max_position_embeddings,
                position_embedding_type="none",
            )
        self.rotary_pos_emb = MultimodalRotaryEmbedding(
            head_dim=model.head_dim, base=model.rope_base, sections=model.mrope_section
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=decoder_block_spec(config, attention_backend=backend, vp_stage=vp_stage,
                                    cp_comm=cp_comm, cp_a2a_size=cp_a2a_size),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process and self.output_head == "value":
            self.value_head = ValueHead(config)
        elif post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                model.padded_vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=not parallel_output,
                # Tied on one stage: the output layer borrows the embedding matrix.
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
            )
        # Tags embedding/output parameters; when tied across stages, copies the first stage's
        # embedding into the last stage's output layer (a collective over the embedding group).
        if self.output_head == "value":
            if pre_process:
                self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        else:
            self.setup_embeddings_and_output_layer()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron-core's, except that a value model has no `output_layer` to pad or tie."""
        if self.output_head == "value":
            return MegatronModule.sharded_state_dict(
                self, prefix, sharded_offsets, ensure_metadata_has_dp_cp_group(metadata)
            )
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        decoder_input: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this stage.

        input_ids [b, s] (first stage, unless `decoder_input` [s, b, h] is given),
        position_ids [3, b, s], segments [b, s] (sample id per token for packed rows, optional).
        Under context parallelism every input holds this rank's zig-zag chunks and `positions`
        [b, s] gives each token's place in its full row (what causal masks compare).
        Returns vocab-parallel logits [s, b, padded_vocab/tp] (padded columns masked) on the
        last stage (per-token fp32 scores [s, b] with `output_head: value`) and hidden states
        [s(/tp under SP), b, h] elsewhere.
        """
        packed_seq_params = None
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)
        angles = self.rotary_pos_emb(position_ids)
        rotary_pos_emb = None
        if self.rope_in_core_attention:
            packed_seq_params = AttentionInputs(
                rotary=RotaryTables.from_angles(angles),
                segments=segments,
                positions=positions,
            )
        else:
            if segments is not None or positions is not None:
                raise NotImplementedError("packed rows (segments) need the local attention spec")
            rotary_pos_emb = angles
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return hidden
        if self.output_head == "value":
            return self.value_head(hidden)
        return self.logits_from_hidden(hidden)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's final hidden states [s, b, h] -> vocab-parallel logits [s, b, V/tp]
        with the padded columns masked (what `forward` returns there)."""
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        logits, _ = self.output_layer(hidden, weight=weight)
        if self.parallel_output:
            start = parallel_state.get_tensor_model_parallel_rank() * logits.size(-1)
        else:
            start = 0
        return mask_padded_vocab(logits, self.vocab_size, vocab_start=start)


class ValueHead(torch.nn.Module):
    """A scalar score per token: `weight` [1, h] (no bias), replicated over tensor-parallel ranks.

    Without sequence parallelism every TP rank holds all positions and computes identical scores
    and gradients. Under SP each rank scores its sequence slice and the slices are gathered
    (backward: each rank keeps its slice's gradient, as every rank computes the same loss); the
    weight's partial gradients are then summed over TP by megatron-core's `finalize_model_grads`
    (the `sequence_parallel` attribute, as for norm weights). Scores are computed in fp32.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(
            torch.empty(1, config.hidden_size, dtype=config.params_dtype)
        )
        torch.nn.init.normal_(self.weight, std=config.init_method_std)
        if self.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [s(/tp), b, h] -> scores [s, b] (fp32)."""
        scores = (hidden.float() @ self.weight.float().t()).squeeze(-1)
        if self.sequence_parallel:
            scores = tensor_parallel.gather_from_sequence_parallel_region(
                scores, tensor_parallel_output_grad=False
            )
        return scores


def mask_padded_vocab(
    logits: torch.Tensor, vocab_size: int, *, vocab_start: int = 0
) -> torch.Tensor:
    """`logits` [..., n] holding vocabulary columns [vocab_start, vocab_start + n), with the
    columns at or past `vocab_size` set to the dtype's most negative value.

    Out of place and differentiable (their gradient is 0), and a no-op when the slice holds no
    padding. A slice that is all padding (a small vocabulary at high TP) is fully masked but
    stays in the autograd graph, so the tensor-parallel collectives of the backward still meet.
    """
    width = logits.size(-1)
    first_pad = vocab_size - vocab_start
    if first_pad >= width:
        return logits
    pad = torch.arange(width, device=logits.device) >= first_pad
    return logits.masked_fill(pad, torch.finfo(logits.dtype).min)
