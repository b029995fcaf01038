"""The HF ⇄ native name map and the tensor-parallel split/merge, on random tensors."""

from __future__ import annotations

import pytest
import torch

from megatron_keye.config import load_config
from megatron_keye.config.schema import ModelConfig
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
    assert fields["tie_word_embeddings"] is False and fields["source_dtype"] is None
    tied = A.model_fields_from_hf_config({**A.hf_config_dict(model), "tie_word_embeddings": True,
                                          "torch_dtype": "bfloat16"})
    assert tied["tie_word_embeddings"] is True and tied["source_dtype"] == "bf16"
    # transformers 5 writes "dtype" instead of "torch_dtype"
    assert A.model_fields_from_hf_config({**A.hf_config_dict(model), "dtype": "float16"})[
        "source_dtype"] == "fp16"
    with pytest.raises(ValueError, match="torch_dtype 'int8'"):
        A.model_fields_from_hf_config({**A.hf_config_dict(model), "torch_dtype": "int8"})


def test_mismatched_checkpoint_names_are_reported(model):
    hf = random_hf(model)
    del hf["model.layers.0.mlp.up_proj.weight"]
    hf["model.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="up_proj.*extra"):
        A.hf_to_native(hf, model)


# ---------------------------------------------------------------------------------------------
# Fixed, hand-written layouts: every row of the tiny tensors below carries a code naming where it
# came from, and the expected native row order is written out literally (not derived from the
# code under test). q rows: 100 + 10*head + row; k: 200 + 10*group + row; v: 300 + 10*group + row;
# gate: 500 + row; up: 600 + row. Shapes: 4 heads in 2 query groups, head_dim 2, ffn 4.


def coded_model(**overrides) -> ModelConfig:
    fields = dict(vocab_size=5, hidden_size=3, num_layers=1, num_attention_heads=4,
                  num_query_groups=2, head_dim=2, ffn_hidden_size=4, mrope_section=[0, 0, 1],
                  make_vocab_size_divisible_by=4)
    return ModelConfig(**{**fields, **overrides})


def coded_hf(model: ModelConfig) -> dict[str, torch.Tensor]:
    def rows(codes):  # every column of a row holds its code
        return torch.tensor(codes, dtype=torch.float32)[:, None].repeat(1, model.hidden_size)

    hd = model.head_dim
    layer = "model.layers.0."
    hf = {
        layer + "self_attn.q_proj.weight": rows([100 + 10 * head + r for head in range(4)
                                                 for r in range(hd)]),
        layer + "self_attn.k_proj.weight": rows([200 + 10 * g + r for g in range(2) for r in range(hd)]),
        layer + "self_attn.v_proj.weight": rows([300 + 10 * g + r for g in range(2) for r in range(hd)]),
        layer + "mlp.gate_proj.weight": rows([500 + r for r in range(4)]),
        layer + "mlp.up_proj.weight": rows([600 + r for r in range(4)]),
        layer + "self_attn.o_proj.weight": torch.zeros(model.hidden_size, 4 * hd),
        layer + "mlp.down_proj.weight": torch.zeros(model.hidden_size, 4),
        "model.embed_tokens.weight": rows([700 + t for t in range(model.vocab_size)]),
        "lm_head.weight": rows([800 + t for t in range(model.vocab_size)]),
    }
    for name in ("input_layernorm", "post_attention_layernorm"):
        hf[layer + name + ".weight"] = torch.ones(model.hidden_size)
    for name in ("self_attn.q_norm", "self_attn.k_norm"):
        hf[layer + name + ".weight"] = torch.ones(hd)
    hf["model.norm.weight"] = torch.ones(model.hidden_size)
    return hf


def codes(tensor: torch.Tensor) -> list[int]:
    return [int(v) for v in tensor[:, 0]]


def test_qkv_layout_is_written_out_literally():
    model = coded_model()
    native = A.hf_to_native(coded_hf(model), model)
    qkv = native["decoder.layers.0.self_attention.linear_qkv.weight"]
    # per query group: [q heads of the group | k_g | v_g]
    assert codes(qkv) == [100, 101, 110, 111, 200, 201, 300, 301,
                          120, 121, 130, 131, 210, 211, 310, 311]
    key = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert codes(A.split_tensor(key, qkv, 0, 2)) == [100, 101, 110, 111, 200, 201, 300, 301]
    assert codes(A.split_tensor(key, qkv, 1, 2)) == [120, 121, 130, 131, 210, 211, 310, 311]


def test_fc1_layout_is_written_out_literally():
    model = coded_model()
    native = A.hf_to_native(coded_hf(model), model)
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    assert codes(native[key]) == [500, 501, 502, 503, 600, 601, 602, 603]  # [gate; up]
    assert codes(A.split_tensor(key, native[key], 0, 2)) == [500, 501, 600, 601]  # [gate_0; up_0]
    assert codes(A.split_tensor(key, native[key], 1, 2)) == [502, 503, 602, 603]  # [gate_1; up_1]


def test_coded_layout_exports_back_exactly():
    model = coded_model()
    hf = coded_hf(model)
    back = A.native_to_hf(A.hf_to_native(hf, model), model)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_vocabulary_rows_are_padded_on_import_and_cut_on_export():
    model = coded_model()  # vocab 5 -> 8 rows
    assert model.padded_vocab_size == 8
    native = A.hf_to_native(coded_hf(model), model)
    for key, base in (("embedding.word_embeddings.weight", 700), ("output_layer.weight", 800)):
        assert codes(native[key]) == [base, base + 1, base + 2, base + 3, base + 4, 0, 0, 0], key
        # the padded size does not depend on TP: each of 2 ranks holds 4 rows
        assert codes(A.split_tensor(key, native[key], 1, 2)) == [base + 4, 0, 0, 0]
    assert A.hf_config_dict(model)["vocab_size"] == 5
    assert A.native_to_hf(native, model)["lm_head.weight"].shape == (5, 3)


@pytest.mark.parametrize("vocab,multiple,padded", [(2047, 128, 2048), (2001, 128, 2048),
                                                   (151936, 128, 151936), (7, 1, 7), (129, 64, 192)])
def test_padded_vocab_size(vocab, multiple, padded):
    assert coded_model(vocab_size=vocab, make_vocab_size_divisible_by=multiple).padded_vocab_size \
        == padded


def test_tied_embeddings_share_one_matrix():
    model = coded_model(tie_word_embeddings=True)
    hf = coded_hf(model)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"]  # how transformers lists a tied head
    native = A.hf_to_native(hf, model)
    assert codes(native["output_layer.weight"]) == [700, 701, 702, 703, 704, 0, 0, 0]
    assert native["output_layer.weight"] is native["embedding.word_embeddings.weight"]
    back = A.native_to_hf(native, model)
    assert "lm_head.weight" not in back  # save_pretrained of a tied model omits it too
    assert A.hf_config_dict(model)["tie_word_embeddings"] is True
    del hf["lm_head.weight"]  # the safetensors of a tied model
    assert torch.equal(A.hf_to_native(hf, model)["output_layer.weight"], native["output_layer.weight"])
    # the last stage of a pipeline reads the embedding matrix for its output layer
    last = A.StageShard(layer_offset=0, num_layers=1, pre_process=False, post_process=True)
    names = A.hf_names_for_stage(model, last)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    local = A.shard_for_stage(native, last)
    assert "embedding.word_embeddings.weight" not in local
    assert codes(local["output_layer.weight"]) == [700, 701, 702, 703, 704, 0, 0, 0]


def test_tied_head_that_differs_is_refused():
    model = coded_model(tie_word_embeddings=True)
    hf = coded_hf(model)  # lm_head codes 800.. differ from the embedding's
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        A.hf_to_native(hf, model)


def test_wrong_vocabulary_rows_are_refused():
    model = coded_model()
    hf = coded_hf(model)
    hf["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"][:4]
    with pytest.raises(ValueError, match="4 rows but config.json vocab_size is 5"):
        A.hf_to_native(hf, model)


def test_padded_logit_columns_are_masked_per_tensor_parallel_rank():
    from megatron_keye.models.keye_vl.language import mask_padded_vocab

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 2, 8, generator=g, requires_grad=True)  # vocab 5 padded to 8
    pieces = [mask_padded_vocab(full[..., 4 * r : 4 * r + 4], 5, vocab_start=4 * r)
              for r in range(2)]
    assert pieces[0].data_ptr() == full.data_ptr()  # no padding on rank 0: untouched
    masked = torch.cat(pieces, -1)
    assert torch.equal(masked[..., :5], full[..., :5].detach())
    assert (masked[..., 5:] == torch.finfo(torch.float32).min).all()
    # softmax, log-probs and entropy equal the unpadded vocabulary's, exactly and without NaN
    assert torch.equal(masked.softmax(-1)[..., :5], full[..., :5].softmax(-1))
    assert torch.equal(masked.log_softmax(-1)[..., :5], full[..., :5].log_softmax(-1))
    p = masked.softmax(-1)
    assert torch.isfinite((p * masked.log_softmax(-1)).sum(-1)).all()
    labels = torch.randint(0, 5, (3, 2), generator=g)
    loss = torch.nn.functional.cross_entropy(masked.reshape(6, 8), labels.reshape(6))
    loss.backward()
    assert (full.grad[..., 5:] == 0).all()
    # a slice that is all padding is masked but keeps its place in the autograd graph
    only_pad = mask_padded_vocab(full[..., 4:8], 3, vocab_start=4)
    assert only_pad.requires_grad and (only_pad == torch.finfo(torch.float32).min).all()
