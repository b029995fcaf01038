"""Start-up checks for the padded vocabulary and the tokenizer's size."""

from __future__ import annotations

import pytest

from megatron_keye.config import ConfigError, load_config, validate
from megatron_keye.data.loaders import check_tokenizer_fits


def test_odd_vocabulary_is_padded_instead_of_refused():
    config = load_config(None, ["model.vocab_size=2047", "parallel.tensor=2"])
    validate(config, 2)
    assert config.model.padded_vocab_size == 2048


def test_padding_that_tensor_parallelism_cannot_split_names_the_field():
    config = load_config(None, ["model.vocab_size=2047", "parallel.tensor=2",
                                "model.make_vocab_size_divisible_by=1"])
    with pytest.raises(ConfigError, match=r"^model.make_vocab_size_divisible_by: the padded "
                       r"vocabulary \(2047 = model.vocab_size 2047 .*parallel.tensor \(2\)"):
        validate(config, 2)
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by: must be >= 1"):
        validate(load_config(None, ["model.make_vocab_size_divisible_by=0"]), 1)


def test_the_padded_size_does_not_depend_on_tensor_parallelism():
    sizes = {load_config(None, ["model.vocab_size=2001", f"parallel.tensor={tp}"]).model
             .padded_vocab_size for tp in (1, 2, 4)}
    assert sizes == {2048}


class _Tokenizer:
    def __init__(self, size):
        self.vocab_size = size


def test_tokenizer_must_fit_the_model():
    config = load_config(None, ["model.vocab_size=1000"])
    check_tokenizer_fits(config, _Tokenizer(1000))
    with pytest.raises(ConfigError, match=r"^model.vocab_size: the tokenizer \(the shipped "
                       r"default tokenizer, data.tokenizer\) has 1001 tokens but "
                       r"model.vocab_size is 1000"):
        check_tokenizer_fits(config, _Tokenizer(1001))


def test_the_shipped_tokenizer_fits_the_tiny_model():
    from megatron_keye.data.text.tokenizer import KeyeTokenizer

    config = load_config(None, [])
    check_tokenizer_fits(config)  # loads the shipped tokenizer
    small = load_config(None, [f"model.vocab_size={KeyeTokenizer.default().vocab_size - 1}"])
    with pytest.raises(ConfigError, match="model.vocab_size"):
        check_tokenizer_fits(small)


def test_the_qwen3_0_6b_flavor_is_tied_and_matches_its_hf_config():
    from megatron_keye.models.keye_vl.hf_adapter import model_fields_from_hf_config

    config = load_config(None, ["model.flavor=0.6b", "parallel.tensor=2", "parallel.pipeline=2"])
    validate(config, 4)
    qwen3_0_6b = {  # Qwen/Qwen3-0.6B config.json (the fields the converter reads)
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "rope_theta": 1000000, "rms_norm_eps": 1e-06,
        "max_position_embeddings": 40960, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "rope_scaling": None,
    }
    fields = model_fields_from_hf_config(qwen3_0_6b)
    for name, value in fields.items():
        if name != "source_dtype":
            assert getattr(config.model, name) == value, name
    assert fields["source_dtype"] == "bf16" and fields["tie_word_embeddings"] is True


def test_export_dtype_follows_the_source_then_the_run():
    from megatron_keye.convert import export_dtype

    assert export_dtype(load_config(None, [])) == "fp32"
    assert export_dtype(load_config(None, ["precision=bf16"])) == "bf16"
    imported_bf16 = load_config(None, ["model.source_dtype=bf16"])
    assert export_dtype(imported_bf16) == "bf16"
    assert export_dtype(imported_bf16, "fp32") == "fp32"  # --dtype overrides


def test_export_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    from megatron_keye.convert import _copy_tokenizer
    from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR, KeyeTokenizer

    size = KeyeTokenizer.default().vocab_size
    with pytest.raises(ValueError, match=f"the tokenizer has {size} tokens but the model's "
                       f"vocab_size is {size - 1}"):
        _copy_tokenizer(DEFAULT_TOKENIZER_DIR, tmp_path, {"vocab_size": size - 1})
    config = {"vocab_size": size}
    _copy_tokenizer(DEFAULT_TOKENIZER_DIR, tmp_path, config)
    assert (tmp_path / "tokenizer.json").exists()
