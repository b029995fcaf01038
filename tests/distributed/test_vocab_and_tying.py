"""Odd vocabularies (padded rows, masked logit columns) and tied embeddings, end to end.

A random transformers Qwen3ForCausalLM with vocab_size 2001 (padded to 2048: 47 masked columns,
all on the second tensor-parallel rank), GQA and head_dim != hidden/heads, untied in fp32 and tied
in bf16, is imported at TP=2×PP=2 and at TP=1; each checkpoint is loaded in the other's layout
(TP=2×PP=2 runs with sequence parallelism).
Checked: logits = transformers' within 1e-4, LM loss = transformers', gradients and the step's
loss equal across layouts (the tied matrix's gradient summed over first and last stage), the two
copies of a tied matrix equal after a step, and HF → native → HF bit-exact in the source dtype.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from megatron_keye.testing.distributed import run_workers
from tests.distributed.conftest import random_hf_model
from tests.distributed.workers import tiny_config
from tests.distributed.workers_vocab import import_evaluate_export_worker, odd_vocab_worker

VOCAB = 2001
TOLERANCE = 1e-5  # relative, as the parity tests


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=["untied_fp32", "tied_bf16"])
def imported(request, tmp_path_factory):
    """The HF model, a batch and transformers' logits and loss; the model's HF directory."""
    tied = request.param == "tied_bf16"
    overrides = (f"model.vocab_size={VOCAB}", f"model.tie_word_embeddings={str(tied).lower()}")
    config = tiny_config({}, seq=16, extra=overrides)
    hf = random_hf_model(config, seed=3)
    root = tmp_path_factory.mktemp(request.param)
    if tied:  # a bf16 checkpoint; the fp32 reference holds exactly its values
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(root / "hf")
    else:
        hf.save_pretrained(root / "hf")
    g = torch.Generator().manual_seed(11)
    rows, seq = 2, 16
    from megatron_keye.models.keye_vl.rope import text_position_ids

    batch = {
        "tokens": torch.randint(0, VOCAB, (rows, seq), generator=g),
        # the last ids of the vocabulary (next to the padding) are labels too
        "labels": torch.cat([torch.full((rows, 2), VOCAB - 1),
                             torch.randint(0, VOCAB, (rows, seq - 2), generator=g)], 1),
        "loss_weights": (torch.rand(rows, seq, generator=g) < 0.8).float(),
        "position_ids": text_position_ids(rows, seq),
    }
    with torch.no_grad():
        logits = hf(batch["tokens"]).logits
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1),
                                reduction="none")
    mask = batch["loss_weights"].reshape(-1)
    return {"tied": tied, "overrides": overrides, "root": root, "batch": batch,
            "hf_logits": logits, "hf_loss": ((per_token * mask).sum() / mask.sum()).item()}


def _merge(results: list) -> dict:
    results = [r for r in results if r is not None]
    merged = {"grads": {}, "after_step": {}, "fresh": {}}
    for r in results:
        merged["grads"].update(r["grads"])
        merged["after_step"].update(r["after_step"])
        merged["fresh"].update(r["fresh_vocab_weights"])
    last = max(results, key=lambda r: r["pp_rank"])
    merged.update({k: last[k] for k in ("logits", "logits_other", "loss", "count", "step_loss",
                                        "grad_norm")})
    return merged


@pytest.fixture(scope="module")
def runs(imported):
    """Import at TP=2×PP=2; on one rank import at TP=1, evaluate the TP=2×PP=2 checkpoint (then
    the TP=1 one) and export the TP=2×PP=2 checkpoint; at TP=2×PP=2 evaluate TP=1's (then its
    own). Three process starts in all."""
    from megatron_keye.convert import import_hf

    root = imported["root"]
    common = dict(model_overrides=imported["overrides"], batch=imported["batch"])
    import_hf(str(root / "hf"), str(root / "tp2pp2"), tensor=2, pipeline=2)
    tp1 = run_workers(import_evaluate_export_worker, 1, hf_dir=str(root / "hf"),
                      import_to=str(root / "tp1"), export_from=str(root / "tp2pp2"),
                      export_to=str(root / "exported"), load=str(root / "tp2pp2"),
                      also_load=str(root / "tp1"), **common)
    layout = {"tensor": 2, "pipeline": 2, "sp": True}
    tp2pp2 = run_workers(odd_vocab_worker, 4, layout=layout,
                         load=str(root / "tp1"), also_load=str(root / "tp2pp2"), **common)
    return {"tp1": _merge(tp1), "tp2pp2": _merge(tp2pp2)}


@pytest.mark.parametrize("layout", ["tp1", "tp2pp2"])
def test_logits_and_loss_match_transformers(imported, runs, layout):
    ours = runs[layout]
    expected = imported["hf_logits"]
    for logits in (ours["logits"], ours["logits_other"]):  # both imports, in this layout
        assert logits.shape == (*expected.shape[:2], 2048)
        assert (logits[..., :VOCAB] - expected).abs().max().item() < 1e-4
        assert (logits[..., VOCAB:] == torch.finfo(torch.float32).min).all()
    # the same weights whichever layout wrote them
    assert torch.equal(ours["logits"], ours["logits_other"])
    assert ours["loss"] == pytest.approx(imported["hf_loss"], rel=TOLERANCE, abs=0)
    assert ours["count"] == int(imported["batch"]["loss_weights"].sum())


def test_gradients_and_step_equal_across_layouts(imported, runs):
    one, four = runs["tp1"], runs["tp2pp2"]
    assert four["loss"] == pytest.approx(one["loss"], rel=TOLERANCE, abs=0)
    assert four["step_loss"] == pytest.approx(one["step_loss"], rel=TOLERANCE, abs=0)
    assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=TOLERANCE, abs=0)
    embedding = "embedding.word_embeddings.weight"
    for name, grad in one["grads"].items():
        assert relative_error(four["grads"][name], grad) < TOLERANCE, name
    # padded rows are never used: no gradient reaches them
    assert (one["grads"][embedding][VOCAB:] == 0).all()
    if imported["tied"]:
        # one parameter at PP=1; under PP=2 the last stage's copy gets the same, summed gradient
        assert "output_layer.weight" not in one["grads"]
        assert relative_error(four["grads"]["output_layer.weight"], one["grads"][embedding]) \
            < TOLERANCE
        assert torch.equal(four["grads"]["output_layer.weight"], four["grads"][embedding])
        # a fresh model starts with the last stage's copy equal to the embedding ...
        assert torch.equal(four["fresh"]["output_layer.weight"], four["fresh"][embedding])
        # ... and the two copies stay equal after the optimizer step
        assert torch.equal(four["after_step"]["output_layer.weight"],
                           four["after_step"][embedding])
    else:
        assert (one["grads"]["output_layer.weight"][VOCAB:] == 0).all()


def test_export_is_bit_exact_in_the_source_dtype(imported, runs):
    from safetensors.torch import load_file

    root = imported["root"]  # exported from the TP=2×PP=2 import, dtype left to the source's
    original = load_file(str(root / "hf" / "model.safetensors"))
    returned = load_file(str(root / "exported" / "model.safetensors"))
    assert set(returned) == set(original)
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype and torch.equal(returned[name], tensor), name
    config = json.loads((root / "exported" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB
    assert config["tie_word_embeddings"] is imported["tied"]
    assert config["torch_dtype"] == ("bfloat16" if imported["tied"] else "float32")
    assert ("lm_head.weight" in returned) is not imported["tied"]
