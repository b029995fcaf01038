"""Reward model: scores and Bradley-Terry loss/gradients at TP=2+SP, CP=2, DP=2 and PP=2 on packed rows
equal the unsharded model with a plain-torch loss; a tiny RM learns planted pairs; its HF export
scores the same in transformers' Qwen3ForSequenceClassification.

One spawned 2-rank world runs every parity layout (and the single-process reference, computed by
both ranks) and then trains the tiny RM; export, import and scoring spawn one process each.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl.hf_adapter import split_tensor
from megatron_keye.testing.distributed import run_workers
from tests.distributed.test_parity import TOLERANCE, relative_error
from tests.distributed.workers_reward import reward_world_worker

LAYOUTS = {
    "tp2_sp": {"tensor": 2, "sp": True},
    "tp2": {"tensor": 2},
    "cp2_packed": {"context": 2},
    "dp2": {},
    "pp2": {"pipeline": 2},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every 2-rank case in one spawned world: the parity layouts, then the tiny RM's training."""
    root = tmp_path_factory.mktemp("rm")
    results = run_workers(reward_world_worker, 2, layouts=LAYOUTS, root=str(root),
                          train_layout={}, steps=40, lr=0.003)
    return results, root


@pytest.fixture(scope="module")
def parity(world):
    return [rank["parity"] for rank in world[0]]


def test_value_model_starts_from_a_language_model_checkpoint(parity):
    for rank in parity:
        result = rank["from_lm"]
        assert result["kept_fresh"] == ["value_head.weight"]
        assert set(result["from_lm"]) == set(result["names"]) - {"value_head.weight"}


def test_reference_is_the_plain_loss_of_the_value_model(parity):
    ref = parity[0]["reference"]
    assert torch.equal(ref["scores"], parity[1]["reference"]["scores"])
    # A non-degenerate case: the pairs disagree, the loss is neither 0 nor saturated.
    assert ref["scores"].shape == (32, 2) and ref["scores"].std() > 0
    assert 0.1 < ref["loss"] < 5.0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reward_loss_and_gradients_equal_unsharded(parity, name):
    ref = parity[0]["reference"]
    pairs = len(parity[0]["pairs"])
    covered = set()
    for rank in parity:
        result = rank[name]
        totals = result["totals"]
        loss, count = totals["__loss__"]
        assert count == pairs, name
        assert abs(loss / count - ref["loss"]) / ref["loss"] < TOLERANCE, name
        # The reported rewards are the unsharded model's at each sample's last real token.
        for key, values in (("rm chosen", ref["chosen"]), ("rm rejected", ref["rejected"])):
            total, n = totals[key]
            assert n == pairs
            assert abs(total - values.sum().item()) < 1e-5 * max(1.0, values.abs().sum().item())
        expected_acc = (ref["chosen"] > ref["rejected"]).float().sum().item()
        assert totals["rm accuracy"][0] == expected_acc
        for key, grad in result["grads"].items():
            expected = split_tensor(key, ref["grads"][key], result["tp_rank"], result["tp_size"])
            err = relative_error(grad, expected)
            assert err < TOLERANCE, f"{name} rank {result['rank']} {key}: relative error {err:.2e}"
            covered.add(key)
        if "scores" in result:
            err = relative_error(result["scores"], ref["scores"])
            assert err < TOLERANCE, f"{name}: scores differ by {err:.2e}"
    assert covered == set(ref["grads"])
    assert "value_head.weight" in covered


@pytest.fixture(scope="module")
def trained(world):
    results, root = world
    return results[0]["train"], root


def test_tiny_reward_model_separates_planted_pairs(trained):
    result, _ = trained
    assert result["after"] >= 0.9, result
    assert result["after"] > result["before"] + 0.2, result
    assert result["losses"][-1] < result["losses"][0]


def test_hf_export_scores_equal_in_transformers(trained):
    from transformers import Qwen3ForSequenceClassification

    from megatron_keye import convert
    from tests.distributed.workers_reward import PAD

    result, root = trained
    out = convert.export_hf(str(root / "ckpt"), str(root / "hf"))
    hf = Qwen3ForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD
    # Right-padded batch: transformers reads the last non-pad token, as the reward head does.
    longest = max(len(s) for s in result["sequences"]) + 3
    ids = torch.full((len(result["sequences"]), longest), PAD)
    for i, seq in enumerate(result["sequences"]):
        ids[i, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        scores = hf(input_ids=ids).logits[:, 0]
    torch.testing.assert_close(scores, torch.tensor(result["rewards"]), rtol=1e-4, atol=1e-4)
    # And back: the sequence classifier imports as a value model and re-exports unchanged.
    from safetensors.torch import load_file

    convert.import_hf(str(out), str(root / "reimported"))
    again = convert.export_hf(str(root / "reimported"), str(root / "hf-again"))
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and "score.weight" in first
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_score_command_matches_transformers(trained, tmp_path):
    """`score` on a JSONL of pairs (three formats, a bad line, a non-pair) equals transformers
    scoring each rendered sequence alone."""
    import json

    from transformers import Qwen3ForSequenceClassification

    from megatron_keye import convert
    from megatron_keye.post_training.scoring import encode_pairs, score_pairs

    _, root = trained
    lines = [
        json.dumps({"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}),
        json.dumps({"prompt": [{"role": "user", "content": "Name a color."}],
                    "chosen": [{"role": "assistant", "content": "Blue"}],
                    "rejected": [{"role": "assistant", "content": "A dog, probably"}],
                    "margin": 0.5}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello there"}],
                    "rejected_response": "Go away"}),
        json.dumps({"text": "plain text is not a pair"}),
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    scores = score_pairs(str(root / "ckpt"), str(data), batch_size=2)
    assert len(scores.keys) == 3
    assert sum(scores.skipped.values()) == 2 and any("rejected" in k for k in scores.skipped)

    hf_dir = root / "hf"
    if not (hf_dir / "config.json").exists():
        convert.export_hf(str(root / "ckpt"), str(hf_dir))
    hf = Qwen3ForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    _, units, _, _, _ = encode_pairs(str(data), tokenizer_dir=None)
    expected = []
    with torch.no_grad():
        for unit in units:
            expected.append([hf(input_ids=torch.as_tensor(s.tokens).view(1, -1)).logits[0, 0].item()
                             for s in unit.samples])
    torch.testing.assert_close(torch.tensor([scores.chosen, scores.rejected]).T,
                               torch.tensor(expected), rtol=1e-4, atol=1e-4)
    assert scores.accuracy == sum(c > r for c, r in expected) / 3


def test_config_errors_name_the_field():
    from megatron_keye.config import load_config, validate
    from megatron_keye.config.loading import ConfigError

    with pytest.raises(ConfigError, match="model.output_head"):
        validate(load_config(None, ["stage.loss_head=reward"]), 1)
    with pytest.raises(ConfigError, match="model.output_head"):
        validate(load_config(None, ["model.output_head=value"]), 1)
    with pytest.raises(ConfigError, match="stage.head.reward.pad_token_id"):
        validate(load_config("tiny-cpu-rm", ["stage.head.reward.pad_token_id=null"]), 4)
    validate(load_config("tiny-cpu-rm", []), 4)
    validate(load_config("keye8b-rm", []), 32)
