"""The HF ⇄ native name map and the tensor-parallel split/merge, on random tensors."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.config import load_config
from megatron_keye.models.keye_vl import hf_adapter as A


@pytest.fixture
def model():
    return load_config(None, []).model


def random_hf(model, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = {k: v for k, v in A.hf_config_dict(model).items() if k != "architectures"}
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in Qwen3ForCausalLM(Qwen3Config(**fields)).state_dict().items()}


def test_round_trip_is_exact(model):
    hf = random_hf(model)
    back = A.native_to_hf(A.hf_to_native(hf, model), model)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_qkv_rows_are_grouped_per_query_group(model):
    hf = random_hf(model)
    native = A.hf_to_native(hf, model)
    qkv = native["decoder.layers.1.self_attention.linear_qkv.weight"]
    hd, per = model.head_dim, model.num_attention_heads // model.num_query_groups
    group1 = qkv[(per + 2) * hd : 2 * (per + 2) * hd]
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    k = hf["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(group1[: per * hd], q[per * hd : 2 * per * hd])
    assert torch.equal(group1[per * hd : (per + 1) * hd], k[hd : 2 * hd])


@pytest.mark.parametrize("tp", [1, 2])
def test_split_then_merge_is_identity(model, tp):
    native = A.hf_to_native(random_hf(model), model)
    for key, full in native.items():
        shards = [A.split_tensor(key, full, r, tp) for r in range(tp)]
        assert torch.equal(A.merge_tensor_shards(key, shards), full), key


def test_fc1_shards_hold_matching_gate_and_up_rows(model):
    native = A.hf_to_native(random_hf(model), model)
    fc1 = native["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = fc1.chunk(2)
    shard = A.split_tensor("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2)
    f = model.ffn_hidden_size // 2
    assert torch.equal(shard[:f], gate[f:]) and torch.equal(shard[f:], up[f:])


def test_stage_shards_take_their_layers(model):
    native = A.hf_to_native(random_hf(model), model)
    last = A.shard_for_stage(native, A.StageShard(layer_offset=2, num_layers=2,
                                                  pre_process=False, post_process=True))
    assert "embedding.word_embeddings.weight" not in last and "output_layer.weight" in last
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"],
                       native["decoder.layers.2.mlp.linear_fc2.weight"])
    assert A.globalize_layer_key("decoder.layers.1.x.weight", 2) == "decoder.layers.3.x.weight"


def test_config_maps_both_ways(model):
    fields = A.model_fields_from_hf_config(A.hf_config_dict(model))
    for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                 "num_query_groups", "head_dim", "ffn_hidden_size", "rope_base"):
        assert fields[name] == getattr(model, name), name
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        A.model_fields_from_hf_config({**A.hf_config_dict(model), "tie_word_embeddings": True})


def test_mismatched_checkpoint_names_are_reported(model):
    hf = random_hf(model)
    del hf["model.layers.0.mlp.up_proj.weight"]
    hf["model.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="up_proj.*extra"):
        A.hf_to_native(hf, model)
