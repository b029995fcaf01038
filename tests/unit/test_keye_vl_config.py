"""Keye-VL config.json ⇄ ModelConfig, the vision name map on its own, and vision validation."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.config import ConfigError, config_from_dict, load_config, validate
from megatron_keye.models.keye_vl import hf_adapter, hf_vision
from tests.distributed.workers_keye_vl import random_hf_state


def vl_model():
    return load_config(None, ["model.vision.flavor=tiny", "model.vocab_size=2000"]).model


def test_config_json_round_trip():
    model = vl_model()
    hf = hf_adapter.hf_config_dict(model)
    assert hf["architectures"] == ["KeyeVL1_5ForConditionalGeneration"]
    fields = hf_adapter.model_fields_from_hf_config(hf)
    again = config_from_dict({"model": {"flavor": "8b", **fields}}).model
    for name in ("vocab_size", "hidden_size", "num_layers", "mrope_section", "image_token_id",
                 "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(again, name) == getattr(model, name), name
    for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                 "patch_size", "position_grid", "layer_norm_eps", "spatial_merge_size",
                 "rope_theta", "projector_norm_eps"):
        assert getattr(again.vision, name) == getattr(model.vision, name), name


def test_released_style_config_reads():
    """The spec's config.json form: rope type "mrope", image_size 384 for a 27x27 table."""
    hf = hf_adapter.hf_config_dict(load_config(None, ["model.flavor=8b",
                                                      "model.vision.flavor=8b"]).model)
    hf["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
    hf["vision_config"]["image_size"] = 384
    fields = hf_adapter.model_fields_from_hf_config(hf)
    assert fields["mrope_section"] == [16, 24, 24]
    assert fields["vision"]["position_grid"] == 27 and fields["vision"]["hidden_size"] == 1152
    assert fields["image_token_id"] == 151655


def test_siglip_config_and_bad_activation():
    siglip = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 84, "patch_size": 14,
              "hidden_act": "gelu_pytorch_tanh", "model_type": "siglip_vision_model"}
    fields = hf_vision.vision_fields_from_hf_config(siglip)
    assert fields["position_grid"] == 6 and fields["ffn_hidden_size"] == 96
    # A full SiglipModel config nests the tower under vision_config.
    assert hf_vision.vision_fields_from_hf_config({"vision_config": siglip}) == fields
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        hf_vision.vision_fields_from_hf_config({**siglip, "hidden_act": "relu"})


def test_vision_name_map_round_trip_and_prefixes():
    model = vl_model()
    hf = random_hf_state(model)
    native = hf_adapter.hf_to_native(hf, model)
    assert {k for k in native if hf_vision.is_vision_key(k)} >= {
        "vision.patch_embedding.weight", "vision.encoder.layers.1.self_attention.linear_qkv.bias",
        "vision.encoder.final_layernorm.weight", "projector.linear_2.weight"}
    back = hf_adapter.native_to_hf(native, model)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    # The fused qkv holds whole heads per row block: head 0 = [q_0; k_0; v_0].
    dim = model.vision.head_dim
    qkv = native["vision.encoder.layers.0.self_attention.linear_qkv.weight"]
    layer = "visual.vision_model.encoder.layers.0.self_attn."
    assert torch.equal(qkv[dim : 2 * dim], hf[layer + "k_proj.weight"][:dim])
    # A SigLIP tower without the Keye prefix, with its pooling head, converts the same.
    tower = {k.removeprefix("visual.vision_model."): v for k, v in hf.items()
             if k.startswith("visual.")}
    tower["head.probe"] = torch.zeros(1)
    prefix = hf_vision.hf_prefix(tower)
    assert prefix == ""
    alone = hf_vision.vision_hf_to_native(tower, model.vision, prefix=prefix, projector=False)
    assert all(torch.equal(alone[k], native[k]) for k in alone)
    assert not any(k.startswith("projector.") for k in alone)
    # Unused released tensors are accepted and dropped.
    extra = {**hf, "visual.vision_model.embeddings.packing_position_embedding.weight":
             torch.zeros(4, 48)}
    assert set(hf_adapter.hf_to_native(extra, model)) == set(native)


def test_vision_token_ids_validated():
    config = load_config(None, ["model.vision.flavor=tiny", "model.video_token_id=4096"])
    with pytest.raises(ConfigError, match="model.video_token_id"):
        validate(config, 1)
    text_only = load_config(None, ["model.video_token_id=4096"])
    validate(text_only, 1)  # unused without a vision tower


def test_media_budgets_travel_with_an_export(tmp_path):
    """An exported vision model carries the image/video token budgets it trained with, and the
    import restores them, so the front end feeds it the same number of vision tokens."""
    import json

    from megatron_keye.config import load_config
    from megatron_keye.convert import (
        PREPROCESSOR_CONFIG,
        media_budgets_from_hf,
        preprocessor_config_dict,
    )

    data = load_config(None, ["data.image_max_tokens=64", "data.video_max_tokens=128"]).data
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor_config_dict(data)))
    assert media_budgets_from_hf(tmp_path) == {"image_max_tokens": 64, "video_max_tokens": 128}
    assert media_budgets_from_hf(tmp_path / "elsewhere") == {}
