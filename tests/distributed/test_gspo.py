"""The GSPO head through the whole model and runtime: GSPO (sequence ratio), GSPO-token and GRPO
(with a k3 KL) losses and every gradient at TP=2+SP, PP=2 and CP=2 on packed rollout rows equal
an independent plain-torch implementation on the single process's logits; GSPO equals GSPO-token
when advantages are uniform; with pi = pi_old the ratio is exactly 1 and nothing is clipped.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl.hf_adapter import split_tensor
from megatron_keye.models.keye_vl.rope import packed_text_position_ids
from megatron_keye.testing.distributed import run_workers
from tests.distributed.test_parity import TOLERANCE, relative_error
from tests.distributed.workers_gspo import gspo_layouts_worker, gspo_reference_worker

ROWS = [[12, 16, 4], [8, 8, 8, 8], [20, 12], [16, 8, 8],
        [8, 12, 12], [4, 28], [12, 12, 8], [32]]  # sample lengths: multiples of 2 x CP
PROMPT = 3

CASES = {
    "gspo": {"variant": "gspo"},
    "gspo_token_mean_kl": {"variant": "gspo", "loss_agg": "token-mean", "kl_coef": 0.05},
    "gspo_token": {"variant": "gspo_token"},
    "grpo_kl": {"variant": "grpo", "clip_low": 0.2, "clip_high": 0.27, "kl_coef": 0.04,
                "loss_agg": "token-mean"},
}
LAYOUTS = {"tp2": {"tensor": 2, "sp": True}, "pp2": {"pipeline": 2}, "cp2": {"context": 2}}


def rollout_batch(vocab: int, *, seed: int) -> dict:
    """Packed rows of responses: prompt tokens untrained, the last token without a target,
    per-token advantages (a sample's value plus noise; GSPO reads each sample's mean) and
    reference log-probs for the KL. `old_logprobs` is filled in by `setup`."""
    g = torch.Generator().manual_seed(seed)
    rows, seq = len(ROWS), sum(ROWS[0])
    sample_ids = torch.zeros(rows, seq, dtype=torch.long)
    weights = torch.zeros(rows, seq)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    advantages = 0.5 * torch.randn(rows, seq, generator=g)
    for row, lengths in enumerate(ROWS):
        start = 0
        for sample, length in enumerate(lengths):
            end = start + length
            sample_ids[row, start:end] = sample
            weights[row, start + PROMPT:end - 1] = 1.0
            labels[row, end - 1] = -100
            advantages[row, start:end] += torch.randn((), generator=g)
            start = end
    return {
        "tokens": torch.randint(0, vocab, (rows, seq), generator=g),
        "labels": labels,
        "loss_weights": weights,
        "sample_ids": sample_ids,
        "position_ids": packed_text_position_ids(sample_ids),
        "advantages": advantages,
        "ref_logprobs": -3.0 * torch.rand(rows, seq, generator=g) - 0.5,
        "old_logprobs": torch.zeros(rows, seq),
    }


@pytest.fixture(scope="module")
def setup(reference_setup):
    vocab = reference_setup["config"].model.vocab_size
    batch = rollout_batch(vocab, seed=11)
    weights = reference_setup["weights"]
    # pi_old: the model's own log-probs plus ~2e-3 of noise, so some GSPO ratios leave the
    # 3e-4 / 4e-4 clip range and some stay inside
    (first,) = run_workers(gspo_reference_worker, 1, weights=weights, batch=batch, cases={})
    g = torch.Generator().manual_seed(5)
    batch["old_logprobs"] = first["logprobs"] + 2e-3 * torch.randn(batch["tokens"].shape,
                                                                   generator=g)
    (reference,) = run_workers(gspo_reference_worker, 1, weights=weights, batch=batch,
                               cases=CASES)
    layouts = run_workers(gspo_layouts_worker, 2, layouts=LAYOUTS, weights=weights,
                          batch=batch, cases=CASES)
    return {"reference": reference, "layouts": layouts}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_policy_losses_match_the_formulas_in_every_layout(layout, setup):
    for case in CASES:
        expected = setup["reference"][case]
        covered = set()
        for r in setup["layouts"]:
            got = r[(layout, case)]
            err = abs(got["loss"] - expected["loss"]) / abs(expected["loss"])
            assert err < TOLERANCE, f"{layout}/{case}: loss {got['loss']} vs {expected['loss']}"
            for key, grad in got["grads"].items():
                want = split_tensor(key, expected["grads"][key], got["tp_rank"], got["tp_size"])
                err = relative_error(grad, want)
                assert err < TOLERANCE, f"{layout}/{case} {key}: relative error {err:.2e}"
                covered.add(key)
        assert covered == set(expected["grads"]), f"{layout}/{case}: parameters missing"


def test_some_ratios_are_clipped_and_some_are_not(setup):
    for layout in LAYOUTS:
        fraction = setup["layouts"][0][(layout, "gspo")]["reports"]["clip fraction"]
        assert 0.0 < fraction < 1.0, (layout, fraction)


def test_on_policy_ratio_is_exactly_one_and_nothing_is_clipped(setup):
    for variant in ("gspo", "gspo_token", "grpo"):
        report = setup["reference"][f"on_policy_{variant}"]
        assert report["ratio"] == 1.0, variant
        assert report["clip fraction"] == 0.0, variant


def test_gspo_equals_gspo_token_when_advantages_are_uniform(setup):
    sequence, token = (setup["reference"][f"uniform_{v}"] for v in ("gspo", "gspo_token"))
    assert abs(sequence["loss"] - token["loss"]) <= 1e-6 * abs(sequence["loss"])
    assert relative_error(token["grad"], sequence["grad"]) < TOLERANCE
    assert sequence["grad"].abs().sum() > 0
