"""Hugging Face Qwen3ForCausalLM ⇄ native weights: an explicit name map plus TP/PP split and merge.

"Native full" names are those of an unsharded (TP=1, PP=1) `Qwen3LanguageModel` state dict with
global layer indices. `shard_for_stage` cuts a full dict into what one tensor-parallel rank of one
pipeline (virtual) stage holds; `merge_tensor_shards` is its inverse. Layout facts encoded here:

- linear_qkv rows are grouped per query group: [q heads of group g | k_g | v_g] for g in groups,
  so a tensor-parallel split of rows hands each rank whole groups.
- linear_fc1 is [gate; up]; each tensor-parallel rank holds [gate_r; up_r].
- Column-parallel weights (qkv, fc1, embedding, output layer) split rows, row-parallel weights
  (linear_proj, fc2) split columns; norms are replicated.
- The native embedding and output layer have `model.padded_vocab_size` rows: HF → native appends
  zero rows, native → HF cuts them (the exported config keeps the real `vocab_size`).
- Tied embeddings (`model.tie_word_embeddings`): HF stores only `model.embed_tokens.weight`
  (a `lm_head.weight` equal to it is accepted and dropped). A full native dict then holds the
  same tensor under both `embedding.word_embeddings.weight` and `output_layer.weight`: a one-stage
  model has no output-layer parameter and ignores the second name, while the last stage of a
  pipeline loads its copy of the shared weight from it.
- A value (reward) model (`model.output_head: value`) has `value_head.weight` [1, h] instead of
  an output layer, ⇄ Qwen3ForSequenceClassification's `score.weight` (num_labels = 1).
- A Keye-VL model (`model.vision` set) adds the vision tower and projector (`hf_vision.py`:
  `visual.vision_model.*`, `mlp_AR.*` ⇄ `vision.*`, `projector.*`, first stage only); the
  language part keeps exactly the Qwen3ForCausalLM names, so transformers loads it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_keye.config.schema import ModelConfig
from megatron_keye.models.keye_vl import hf_vision

LAYER_PREFIX = "decoder.layers."

# Per-layer names: native suffix -> HF suffix, for tensors that map one to one.
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Native tensors with one row per vocabulary entry (padded to `padded_vocab_size`).
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
_GLOBAL_DIRECT = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
VALUE_HEAD, HF_SCORE = "value_head.weight", "score.weight"
# How each native tensor is split over tensor-parallel ranks: dim, or "fc1" for [gate; up].
_TP_SPLIT = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": 1,
}


@dataclass(frozen=True, kw_only=True)
class StageShard:
    """What one rank of one pipeline (virtual) stage holds."""

    tp_rank: int = 0
    tp_size: int = 1
    layer_offset: int = 0
    num_layers: int
    pre_process: bool = True
    post_process: bool = True


def hf_to_native(
    hf: Mapping[str, torch.Tensor], model: ModelConfig, *, layers: range | None = None
) -> dict[str, torch.Tensor]:
    """Native state dict from a Qwen3ForCausalLM state dict.

    With `layers=None` the whole model is converted and the names are checked both ways; with a
    range, only those layers plus whichever of embedding/final norm/LM head are present (one
    pipeline stage's share, read lazily from safetensors by the converter).
    """
    if layers is None:
        _check_hf_names(hf, model)
        layers = range(model.num_layers)
    out = {native: hf[name] for native, name in _GLOBAL_DIRECT.items() if name in hf}
    if model.vision is not None and hf_vision.KEYE_PATCH_EMBEDDING in hf:
        out.update(hf_vision.vision_hf_to_native(hf, model.vision))
    value = model.output_head == "value"
    if model.tie_word_embeddings or value:
        out.pop("output_layer.weight", None)
    if value and HF_SCORE in hf:
        out[VALUE_HEAD] = hf[HF_SCORE]
    for key in _VOCAB_ROWS:
        if key in out:
            out[key] = pad_vocab_rows(out[key], model)
    if model.tie_word_embeddings and not value and "embedding.word_embeddings.weight" in out:
        out["output_layer.weight"] = out["embedding.word_embeddings.weight"]
    groups, per_group = model.num_query_groups, model.num_attention_heads // model.num_query_groups
    hd, h = model.head_dim, model.hidden_size
    for i in layers:
        src, dst = f"model.layers.{i}.", f"{LAYER_PREFIX}{i}."
        for native, name in _LAYER_DIRECT.items():
            out[dst + native] = hf[src + name]
        q = hf[src + "self_attn.q_proj.weight"].reshape(groups, per_group * hd, h)
        k = hf[src + "self_attn.k_proj.weight"].reshape(groups, hd, h)
        v = hf[src + "self_attn.v_proj.weight"].reshape(groups, hd, h)
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, h)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], 0
        )
    return out


def hf_names_for_stage(model: ModelConfig, shard: StageShard) -> list[str]:
    """The HF tensor names one pipeline stage needs."""
    embedding = _GLOBAL_DIRECT["embedding.word_embeddings.weight"]
    head = embedding if model.tie_word_embeddings else _GLOBAL_DIRECT["output_layer.weight"]
    if model.output_head == "value":
        head = HF_SCORE
    names = []
    if shard.pre_process:
        names.append(embedding)
    if shard.post_process:
        names.append(_GLOBAL_DIRECT["decoder.final_layernorm.weight"])
        if head not in names:
            names.append(head)
    for i in range(shard.layer_offset, shard.layer_offset + shard.num_layers):
        names += [f"model.layers.{i}.{n}" for n in _hf_layer_names()]
    if shard.pre_process and model.vision is not None:
        names += hf_vision.hf_vision_names(model.vision)
    return names


def _hf_layer_names() -> list[str]:
    return list(_LAYER_DIRECT.values()) + [
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight",
    ]


def native_to_hf(native: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Qwen3ForCausalLM state dict from a full native state dict (padding rows cut)."""
    out = {}
    for key, name in _GLOBAL_DIRECT.items():
        if key == "output_layer.weight" and model.output_head == "value":
            out[HF_SCORE] = native[VALUE_HEAD]
            continue
        if key == "output_layer.weight" and model.tie_word_embeddings:
            continue  # transformers ties lm_head to embed_tokens itself
        out[name] = cut_vocab_rows(native[key], model) if key in _VOCAB_ROWS else native[key]
    groups, per_group = model.num_query_groups, model.num_attention_heads // model.num_query_groups
    hd, h = model.head_dim, model.hidden_size
    for i in range(model.num_layers):
        src, dst = f"{LAYER_PREFIX}{i}.", f"model.layers.{i}."
        for key, name in _LAYER_DIRECT.items():
            out[dst + name] = native[src + key]
        qkv = native[src + "self_attention.linear_qkv.weight"].reshape(groups, (per_group + 2) * hd, h)
        q, k, v = qkv.split([per_group * hd, hd, hd], dim=1)
        out[dst + "self_attn.q_proj.weight"] = q.reshape(-1, h)
        out[dst + "self_attn.k_proj.weight"] = k.reshape(-1, h)
        out[dst + "self_attn.v_proj.weight"] = v.reshape(-1, h)
        gate, up = native[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
    if model.vision is not None:
        out.update(hf_vision.vision_native_to_hf(native, model.vision))
    return {k: v.contiguous() for k, v in out.items()}


def shard_for_stage(
    full: Mapping[str, torch.Tensor], shard: StageShard
) -> dict[str, torch.Tensor]:
    """The local state dict of one rank of one stage, from a full native state dict."""
    out = {}
    for key, tensor in full.items():
        local_key = _localize(key, shard)
        if local_key is None:
            continue
        out[local_key] = split_tensor(key, tensor, shard.tp_rank, shard.tp_size)
    return out


def split_tensor(key: str, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's piece of a full native tensor."""
    how = _split_rule(key)
    if how is None or tp_size == 1:
        return tensor.clone()
    if how == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
    return tensor.chunk(tp_size, dim=how)[tp_rank].clone()


def tensor_parallel_dim(key: str) -> int | None:
    """The dimension a native tensor is split along over tensor-parallel ranks (None: replicated)."""
    how = _split_rule(key)
    return 0 if how == "fc1" else how


def merge_tensor_shards(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_tensor` over all tensor-parallel ranks (in rank order)."""
    how = _split_rule(key)
    if how is None or len(shards) == 1:
        return shards[0]
    if how == "fc1":
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], 0)
    return torch.cat(shards, dim=how)


def globalize_layer_key(local_key: str, layer_offset: int) -> str:
    """`decoder.layers.{i}.x` of a stage → `decoder.layers.{offset+i}.x`."""
    if not local_key.startswith(LAYER_PREFIX):
        return local_key
    index, rest = local_key[len(LAYER_PREFIX) :].split(".", 1)
    return f"{LAYER_PREFIX}{int(index) + layer_offset}.{rest}"


def hf_config_dict(model: ModelConfig) -> dict:
    """A transformers Qwen3Config (as a dict) for these model shapes; for a Keye-VL model the
    Keye-VL-1.5 config.json (the same flat text keys plus the vision section, spec section 3)."""
    text = _text_config_dict(model)
    if model.output_head == "value":
        text.update(architectures=["Qwen3ForSequenceClassification"],
                    id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if model.vision is None:
        return text
    return {
        **text,
        "architectures": ["KeyeVL1_5ForConditionalGeneration"],
        "model_type": "KeyeVL1_5",
        "image_token_id": model.image_token_id,
        "video_token_id": model.video_token_id,
        "vision_start_token_id": model.vision_start_token_id,
        "vision_end_token_id": model.vision_end_token_id,
        # M-RoPE is told by `mrope_section`; the type says "default" (as transformers rewrites
        # Qwen2-VL's "mrope"), so transformers' Qwen3ForCausalLM loads the language part from
        # this config.json as is (it has no "mrope" rope type). Import accepts either type.
        "rope_scaling": {"type": "default", "mrope_section": list(model.mrope_section)},
        "vision_config": hf_vision.hf_vision_config_dict(model.vision),
    }


def _text_config_dict(model: ModelConfig) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_base,
        "tie_word_embeddings": model.tie_word_embeddings,
        "attention_bias": False,
        "initializer_range": model.init_std,
    }


def model_fields_from_hf_config(hf: Mapping) -> dict:
    """`ModelConfig` fields from a Qwen3 config.json."""
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 1e6)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads", heads),
        head_dim=head_dim,
        ffn_hidden_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_base=float(rope),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        source_dtype=source_dtype(hf),
    )
    half = head_dim // 2
    sections = (hf.get("rope_scaling") or {}).get("mrope_section")
    if sections is None:  # text-only checkpoint: any split works; keep Keye's 1:1.5:1.5 ratio
        t = half // 4
        h = (half - t) // 2
        sections = [t, h, half - t - h]
    fields["mrope_section"] = list(sections)
    if any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        fields["output_head"] = "value"
    if "vision_config" in hf:
        fields["vision"] = hf_vision.vision_fields_from_hf_config(hf)
        for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id"):
            if key in hf:
                fields[key] = int(hf[key])
    return fields


def source_dtype(hf: Mapping) -> str | None:
    """Our name ("fp32", "bf16", "fp16") for the weights' dtype a config.json declares."""
    declared = hf.get("torch_dtype") or hf.get("dtype")  # transformers 5 writes "dtype"
    if declared is None:
        return None
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    name = str(declared).removeprefix("torch.")
    if name not in names:
        raise ValueError(f"config.json: unsupported torch_dtype {declared!r}; expected one of "
                         f"{sorted(names)}")
    return names[name]


def pad_vocab_rows(tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """An HF [vocab_size, h] embedding/head with zero rows appended to `padded_vocab_size`."""
    if tensor.size(0) != model.vocab_size:
        raise ValueError(
            f"vocabulary tensor has {tensor.size(0)} rows but config.json vocab_size is "
            f"{model.vocab_size}"
        )
    extra = model.padded_vocab_size - model.vocab_size
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])], 0)


def cut_vocab_rows(tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Inverse of `pad_vocab_rows`: the first `vocab_size` rows."""
    if tensor.size(0) != model.padded_vocab_size:
        raise ValueError(
            f"vocabulary tensor has {tensor.size(0)} rows, expected the padded "
            f"{model.padded_vocab_size}"
        )
    return tensor[: model.vocab_size]


def _split_rule(key: str):
    if hf_vision.is_vision_key(key):
        return hf_vision.tensor_parallel_dim(key)
    for suffix, how in _TP_SPLIT.items():
        if key.endswith(suffix):
            return how
    return None


def _localize(key: str, shard: StageShard) -> str | None:
    if key.startswith("embedding.") or hf_vision.is_vision_key(key):
        return key if shard.pre_process else None
    if key.startswith(("output_layer.", "value_head.", "decoder.final_layernorm.")):
        return key if shard.post_process else None
    if key.startswith(LAYER_PREFIX):
        index, rest = key[len(LAYER_PREFIX) :].split(".", 1)
        local = int(index) - shard.layer_offset
        if 0 <= local < shard.num_layers:
            return f"{LAYER_PREFIX}{local}.{rest}"
        return None
    raise KeyError(f"unexpected native parameter name {key!r}")


def _check_hf_names(hf: Mapping[str, torch.Tensor], model: ModelConfig) -> None:
    expected = set(_GLOBAL_DIRECT.values())
    for i in range(model.num_layers):
        expected.update(f"model.layers.{i}.{n}" for n in _hf_layer_names())
    present = {k for k in hf if not k.endswith("rotary_emb.inv_freq")}
    if model.vision is not None:
        expected.update(hf_vision.hf_vision_names(model.vision))
        present = {k for k in present if not hf_vision.is_dropped(k)}
    head, embedding = _GLOBAL_DIRECT["output_layer.weight"], _GLOBAL_DIRECT["embedding.word_embeddings.weight"]
    if model.output_head == "value":
        expected.discard(head)
        expected.add(HF_SCORE)
    elif model.tie_word_embeddings:
        expected.discard(head)
        if head in present:  # a tied state dict may list the shared matrix twice
            if embedding in hf and not torch.equal(hf[head], hf[embedding]):
                raise ValueError(
                    f"tie_word_embeddings=true but {head} differs from {embedding}"
                )
            present.discard(head)
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise KeyError(
            f"HF checkpoint does not match the model config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
