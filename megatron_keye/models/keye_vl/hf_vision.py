"""Hugging Face ⇄ native names of the Keye-VL-1.5 vision tower and projector (spec section 3).

HF (Keye-VL-1.5 checkpoint)                                native (`KeyeVLModel`, first stage)
`visual.vision_model.embeddings.patch_embedding.*`         `vision.patch_embedding.*`
`visual.vision_model.embeddings.position_embedding.weight` `vision.position_embedding.weight`
`visual.vision_model.encoder.layers.{i}.layer_norm1.*`     `vision.encoder.layers.{i}.input_layernorm.*`
`  ... self_attn.{q,k,v}_proj.*`                           `  ... self_attention.linear_qkv.*`
`  ... self_attn.out_proj.*`                               `  ... self_attention.linear_proj.*`
`  ... layer_norm2.*`                                      `  ... pre_mlp_layernorm.*`
`  ... mlp.fc1.*`, `mlp.fc2.*`                             `  ... mlp.linear_fc1.*`, `mlp.linear_fc2.*`
`visual.vision_model.post_layernorm.*`                     `vision.encoder.final_layernorm.*`
`mlp_AR.{pre_norm,linear_1,linear_2}.*`                    `projector.{pre_norm,linear_1,linear_2}.*`

The native fused qkv (weight and bias) groups rows per head: [q_h; k_h; v_h] for each head h
(megatron-core's layout with one query group per head), so a tensor-parallel row split hands
each rank whole heads. A standalone SigLIP vision tower (transformers' `SiglipVisionModel`, or
the vision half of a `SiglipModel`) uses the same names under the prefix `vision_model.` or
none; `hf_prefix` finds which. `packing_position_embedding` (unused in 1.5) and the SigLIP
pooling `head.*` are accepted and dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_keye.config.schema import VisionConfig

KEYE_VISION_PREFIX = "visual.vision_model."
KEYE_PATCH_EMBEDDING = KEYE_VISION_PREFIX + "embeddings.patch_embedding.weight"
PROJECTOR_PREFIX_HF = "mlp_AR."
NATIVE_VISION = "vision."
NATIVE_PROJECTOR = "projector."
VISION_LAYERS = "vision.encoder.layers."
# HF tensors that exist in some checkpoints but have no native counterpart (never used).
DROPPED = ("embeddings.packing_position_embedding.", "head.")

_EMBEDDINGS = {
    "patch_embedding.weight": "embeddings.patch_embedding.weight",
    "patch_embedding.bias": "embeddings.patch_embedding.bias",
    "position_embedding.weight": "embeddings.position_embedding.weight",
    "encoder.final_layernorm.weight": "post_layernorm.weight",
    "encoder.final_layernorm.bias": "post_layernorm.bias",
}
_LAYER = {
    "input_layernorm.weight": "layer_norm1.weight",
    "input_layernorm.bias": "layer_norm1.bias",
    "pre_mlp_layernorm.weight": "layer_norm2.weight",
    "pre_mlp_layernorm.bias": "layer_norm2.bias",
    "self_attention.linear_proj.weight": "self_attn.out_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.out_proj.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
    "mlp.linear_fc2.bias": "mlp.fc2.bias",
}
_PROJECTOR = ("pre_norm.weight", "pre_norm.bias", "linear_1.weight", "linear_1.bias",
              "linear_2.weight", "linear_2.bias")


def is_vision_key(native_key: str) -> bool:
    """Whether a native name belongs to the vision tower or the projector."""
    return native_key.startswith((NATIVE_VISION, NATIVE_PROJECTOR))


def tensor_parallel_dim(native_key: str) -> int | None:
    """The dim a native vision/projector tensor is split along over TP ranks (None: replicated)."""
    from megatron_keye.models.keye_vl.projector import Projector
    from megatron_keye.models.keye_vl.vision import VisionTower

    if native_key.startswith(NATIVE_VISION):
        return VisionTower.tensor_parallel_dim(native_key)
    return Projector.tensor_parallel_dim(native_key)


def hf_prefix(names, *, where: str = "checkpoint") -> str:
    """The prefix of the vision tower's names in an HF state dict (Keye, SiglipModel or tower)."""
    for prefix in (KEYE_VISION_PREFIX, "vision_model.", ""):
        if f"{prefix}embeddings.patch_embedding.weight" in names:
            return prefix
    raise KeyError(f"{where}: no vision tower found (no *embeddings.patch_embedding.weight "
                   f"under visual.vision_model., vision_model. or the root)")


def hf_vision_names(vision: VisionConfig, *, prefix: str = KEYE_VISION_PREFIX,
                    projector: bool = True) -> list[str]:
    """Every HF tensor name of the tower (and the projector) for this config."""
    names = [prefix + name for name in _EMBEDDINGS.values()]
    for i in range(vision.num_layers):
        layer = f"{prefix}encoder.layers.{i}."
        names += [layer + n for n in _LAYER.values()]
        names += [f"{layer}self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")]
    if projector:
        names += [PROJECTOR_PREFIX_HF + n for n in _PROJECTOR]
    return names


def is_dropped(name: str, prefix: str = KEYE_VISION_PREFIX) -> bool:
    """An HF vision tensor that is accepted and ignored (see module doc)."""
    return name.startswith(tuple(prefix + d for d in DROPPED))


def vision_hf_to_native(hf: Mapping[str, torch.Tensor], vision: VisionConfig, *,
                        prefix: str = KEYE_VISION_PREFIX,
                        projector: bool = True) -> dict[str, torch.Tensor]:
    """Native `vision.*` (and `projector.*`) tensors from HF names under `prefix`."""
    out = {NATIVE_VISION + native: hf[prefix + name] for native, name in _EMBEDDINGS.items()}
    heads, dim = vision.num_attention_heads, vision.head_dim
    for i in range(vision.num_layers):
        src, dst = f"{prefix}encoder.layers.{i}.", f"{VISION_LAYERS}{i}."
        for native, name in _LAYER.items():
            out[dst + native] = hf[src + name]
        for kind in ("weight", "bias"):
            parts = [hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            trailing = parts[0].shape[1:]
            stacked = torch.cat([t.reshape(heads, dim, *trailing) for t in parts], dim=1)
            out[f"{dst}self_attention.linear_qkv.{kind}"] = stacked.reshape(3 * heads * dim,
                                                                            *trailing)
    if projector:
        for name in _PROJECTOR:
            out[NATIVE_PROJECTOR + name] = hf[PROJECTOR_PREFIX_HF + name]
    return out


def vision_native_to_hf(native: Mapping[str, torch.Tensor],
                        vision: VisionConfig) -> dict[str, torch.Tensor]:
    """HF `visual.vision_model.*` and `mlp_AR.*` tensors from a full native state dict."""
    prefix = KEYE_VISION_PREFIX
    out = {prefix + name: native[NATIVE_VISION + key] for key, name in _EMBEDDINGS.items()}
    heads, dim = vision.num_attention_heads, vision.head_dim
    for i in range(vision.num_layers):
        src, dst = f"{VISION_LAYERS}{i}.", f"{prefix}encoder.layers.{i}."
        for key, name in _LAYER.items():
            out[dst + name] = native[src + key]
        for kind in ("weight", "bias"):
            qkv = native[f"{src}self_attention.linear_qkv.{kind}"]
            trailing = qkv.shape[1:]
            q, k, v = qkv.reshape(heads, 3 * dim, *trailing).split(dim, dim=1)
            for name, part in zip("qkv", (q, k, v), strict=True):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = part.reshape(heads * dim, *trailing)
    for name in _PROJECTOR:
        out[PROJECTOR_PREFIX_HF + name] = native[NATIVE_PROJECTOR + name]
    return {k: v.contiguous() for k, v in out.items()}


def hf_vision_config_dict(vision: VisionConfig) -> dict:
    """The `vision_config` section of a Keye-VL-1.5 config.json."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.ffn_hidden_size,
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_attention_heads,
        "num_channels": vision.num_channels,
        "patch_size": vision.patch_size,
        # Any image_size with image_size // patch_size == position_grid describes the same
        # table (the released so400m-patch14-384 says 384 for 27x27).
        "image_size": vision.position_grid * vision.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": vision.layer_norm_eps,
        "spatial_merge_size": vision.spatial_merge_size,
        "tokens_per_second": 2,
        "rope_theta": vision.rope_theta,
        "projector_layer_norm_eps": vision.projector_norm_eps,
        "initializer_range": vision.init_std,
    }


def vision_fields_from_hf_config(hf: Mapping, *, where: str = "config.json") -> dict:
    """`VisionConfig` fields from a Keye `vision_config` or a SigLIP (vision) config.json."""
    section = hf.get("vision_config", hf)
    act = section.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{where}: vision hidden_act {act!r} is not supported (the tower uses "
                         f"gelu_pytorch_tanh)")
    try:
        patch = int(section["patch_size"])
        fields = dict(
            flavor="8b",
            hidden_size=int(section["hidden_size"]),
            num_layers=int(section["num_hidden_layers"]),
            num_attention_heads=int(section["num_attention_heads"]),
            ffn_hidden_size=int(section["intermediate_size"]),
            patch_size=patch,
            num_channels=int(section.get("num_channels", 3)),
            position_grid=int(section["image_size"]) // patch,
            layer_norm_eps=float(section.get("layer_norm_eps", 1e-6)),
        )
    except KeyError as err:
        raise ValueError(f"{where}: vision config lacks {err}") from None
    optional = {"spatial_merge_size": "spatial_merge_size", "rope_theta": "rope_theta",
                "projector_layer_norm_eps": "projector_norm_eps",
                "initializer_range": "init_std"}
    for key, field in optional.items():
        if key in section:
            fields[field] = type(VisionConfig.__dataclass_fields__[field].default)(section[key])
    return fields
