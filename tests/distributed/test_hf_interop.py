"""The native model against transformers' Qwen3ForCausalLM, and the HF ⇄ native converter."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers import logits_worker


@pytest.fixture(scope="module")
def tokens(reference_setup):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, reference_setup["config"].model.vocab_size, (2, 24), generator=g)


@pytest.mark.parametrize("layout,world", [({}, 1), ({"tensor": 2, "pipeline": 2}, 4)],
                         ids=["tp1", "tp2_pp2"])
def test_logits_match_transformers(reference_setup, tokens, layout, world):
    results = run_workers(logits_worker, world, layout=layout,
                          weights=reference_setup["weights"], tokens=tokens)
    ours = next(r for r in results if r is not None)
    with torch.no_grad():
        expected = reference_setup["hf"](tokens).logits
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4


def test_hf_native_hf_round_trip_is_bit_exact(tmp_path, reference_setup):
    from safetensors.torch import load_file

    from megatron_keye.convert import export_hf, import_hf

    hf = reference_setup["hf"]
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir, safe_serialization=True)
    import_hf(str(hf_dir), str(tmp_path / "native"), tensor=2, pipeline=2)
    assert (tmp_path / "native" / "latest").read_text().strip() == "iter_0000000"
    export_hf(str(tmp_path / "native"), str(tmp_path / "back"))
    original = load_file(str(hf_dir / "model.safetensors"))
    returned = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(returned) == set(original)
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["num_key_value_heads"] == hf.config.num_key_value_heads
    assert config["head_dim"] == hf.config.head_dim
    assert config["tie_word_embeddings"] is False


def test_exported_model_loads_in_transformers(tmp_path, reference_setup, tokens):
    from transformers import AutoModelForCausalLM

    from megatron_keye.convert import export_hf, import_hf

    hf = reference_setup["hf"]
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "native"))
    export_hf(str(tmp_path / "native"), str(tmp_path / "back"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)
