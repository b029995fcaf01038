"""Post-training heads through the whole model and runtime: SFT, DPO (sigmoid, IPO), BCO-pair and
MPO losses and every gradient at TP=2, PP=2 and CP=2 on packed pairs equal an independent plain-torch
implementation on the single process's logits; a frozen reference equal to the policy gives
DPO = log 2 with zero margins; BCO's running shift survives a kill-and-resume exactly.

One spawned world per world size: the single process (references), two ranks (every layout and
case), two ranks again for the DP=2 resume runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_keye.models.keye_vl.hf_adapter import split_tensor
from megatron_keye.models.keye_vl.rope import packed_text_position_ids
from megatron_keye.testing.distributed import run_workers
from tests.distributed.test_parity import TOLERANCE, relative_error
from tests.distributed.workers_heads import layouts_worker, reference_worker

# per row: sample lengths (multiples of 2 x CP) and roles; 0 = row padding outside any pair
ROW_LAYOUTS = [
    ([12, 16, 4], [1, 2, 0]),
    ([16, 8, 8], [1, 2, 0]),
    ([8, 8, 8, 8], [1, 2, 1, 2]),  # two pairs in one row
    ([8, 20, 4], [1, 2, 0]),
    ([20, 12], [1, 2]),
    ([8, 12, 8, 4], [1, 2, 0, 0]),
    ([8, 12, 12], [1, 2, 0]),
    ([12, 12, 8], [1, 2, 0]),
]
PROMPT = 3  # leading tokens of every sample that are prompt (loss weight 0)

CASES = {
    "lm": {"head": "lm"},
    "sft_token": {"head": "sft"},
    "sft_square": {"head": "sft", "sft": {"loss_avg": "square"}},
    "sft_sample": {"head": "sft", "sft": {"loss_avg": "sample"}},
    "dpo_smoothed": {"head": "dpo", "preference": {"beta": 0.3, "label_smoothing": 0.1}},
    "ipo": {"head": "dpo", "preference": {"beta": 0.5, "loss_types": ["ipo"]}},
    "mpo": {"head": "mpo", "delta": 0.05},
}
LAYOUTS = {"tp2": {"tensor": 2, "sp": True}, "pp2": {"pipeline": 2}, "cp2": {"context": 2}}


def pair_batch(vocab: int, *, seed: int) -> dict:
    """Rows of packed chosen/rejected samples with prompt masks, ignored sample ends (label -100,
    weight 0) and random per-token reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    seq = sum(ROW_LAYOUTS[0][0])
    rows = len(ROW_LAYOUTS)
    sample_ids = torch.zeros(rows, seq, dtype=torch.long)
    pair_role = torch.zeros(rows, seq, dtype=torch.long)
    loss_weights = torch.zeros(rows, seq)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    for row, (lengths, roles) in enumerate(ROW_LAYOUTS):
        start = 0
        for sample, (length, role) in enumerate(zip(lengths, roles, strict=True)):
            end = start + length
            sample_ids[row, start:end] = sample
            pair_role[row, start:end] = role
            if role:
                loss_weights[row, start + PROMPT:end] = 1.0
            labels[row, end - 1] = -100  # the last token of a sample has no target
            loss_weights[row, end - 1] = 0.0
            start = end
    return {
        "tokens": torch.randint(0, vocab, (rows, seq), generator=g),
        "labels": labels,
        "loss_weights": loss_weights,
        "sample_ids": sample_ids,
        "pair_role": pair_role,
        "ref_logprobs": -3.0 * torch.rand(rows, seq, generator=g) - 0.5,
        "position_ids": packed_text_position_ids(sample_ids),
    }


@pytest.fixture(scope="module")
def setup(reference_setup, tmp_path_factory):
    config = reference_setup["config"]
    batch = pair_batch(config.model.vocab_size, seed=3)
    (reference,) = run_workers(reference_worker, 1, weights=reference_setup["weights"],
                               batch=batch, cases=CASES,
                               pipeline_dir=str(tmp_path_factory.mktemp("pipeline")))
    return {"batch": batch, "reference": reference, "weights": reference_setup["weights"]}


def flipped(batch: dict) -> dict:
    """The same rows in reverse order (a second global batch)."""
    return {k: (v.flip(1) if k == "position_ids" else v.flip(0)) for k, v in batch.items()}


def logprobs_inputs() -> dict:
    """Logits over 13 real + 3 padding columns (rank 1 of TP=2 holds the padding), T = 0.8."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 2, 16, generator=g)
    logits[..., 13:] = torch.finfo(torch.float32).min
    labels = torch.randint(0, 13, (6, 2), generator=g)
    labels[1, 0] = -100
    return {"logits": logits, "labels": labels, "vocab": 13, "temperature": 0.8,
            "weights": (torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g))}


def test_logprobs_and_entropy_over_a_tp2_vocabulary(layouts_results):
    from tests.distributed.workers_heads import reference_token_logprobs

    inputs = logprobs_inputs()
    logits = inputs["logits"].clone().requires_grad_(True)
    logp, entropy = reference_token_logprobs(logits, inputs["labels"].T, 13, 0.8)
    w_logp, w_entropy = inputs["weights"]
    (grad,) = torch.autograd.grad((logp.T * w_logp + entropy.T * w_entropy).sum(), logits)
    for r in layouts_results:
        got = r["tp_logprobs"]
        assert got["size"] == 2
        assert relative_error(got["logp"], logp.T) < TOLERANCE
        assert relative_error(got["entropy"], entropy.T) < TOLERANCE
        assert relative_error(got["grad"], grad.chunk(2, dim=-1)[got["rank"]]) < TOLERANCE


@pytest.fixture(scope="module")
def layouts_results(setup, tmp_path_factory):
    # the resume runs train MPO at DP=2 on two alternating global batches
    resume = {"batches": [setup["batch"], flipped(setup["batch"])], "weights": setup["weights"],
              "iters": 4, "layout": {}}
    return run_workers(layouts_worker, 2, layouts=LAYOUTS, weights=setup["weights"],
                       batch=setup["batch"], cases=CASES, resume=resume,
                       frozen_layouts=("pp2", "cp2"),
                       logprobs_check=logprobs_inputs(),
                       checkpoint_dir=str(tmp_path_factory.mktemp("heads")))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_heads_match_the_formulas_in_every_layout(layout, setup, layouts_results):
    for case in CASES:
        expected = setup["reference"][case]
        covered = set()
        for r in layouts_results:
            got = r[(layout, case)]
            err = abs(got["loss"] - expected["loss"]) / abs(expected["loss"])
            assert err < TOLERANCE, f"{layout}/{case}: loss {got['loss']} vs {expected['loss']}"
            for key, grad in got["grads"].items():
                want = split_tensor(key, expected["grads"][key], got["tp_rank"], got["tp_size"])
                err = relative_error(grad, want)
                assert err < TOLERANCE, f"{layout}/{case} rank {got['rank']} {key}: {err:.2e}"
                covered.add(key)
        assert covered == set(expected["grads"]), f"{layout}/{case}: parameters missing"


def test_sft_with_unit_weights_is_the_lm_head(layouts_results):
    for r in layouts_results:
        for layout in LAYOUTS:
            lm, sft = r[(layout, "lm")], r[(layout, "sft_token")]
            assert sft["loss"] == pytest.approx(lm["loss"], rel=1e-6) and sft["count"] == lm["count"]
            for key, grad in sft["grads"].items():
                assert relative_error(grad, lm["grads"][key]) < 1e-6, f"{layout} {key}"


def test_sample_and_square_weights_change_the_loss(setup):
    losses = {c: setup["reference"][c]["loss"] for c in ("sft_token", "sft_square", "sft_sample")}
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


def test_preference_metrics_in_every_layout(setup, layouts_results):
    for case in ("dpo_smoothed", "ipo", "mpo"):
        expected = setup["reference"][case]["metrics"]
        for r in layouts_results:
            for layout in LAYOUTS:
                reports = r[(layout, case)]["reports"]
                for ours, theirs in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                                     ("rewards/margins", "margins"),
                                     ("rewards/accuracies", "accuracy")):
                    assert reports[ours] == pytest.approx(expected[theirs], rel=1e-5, abs=1e-7), \
                        f"{layout}/{case} {ours}"
        assert 0.0 < expected["accuracy"] < 1.0  # random pairs: some right, some wrong
    mpo = layouts_results[0][("tp2", "mpo")]["reports"]
    assert mpo["bco/delta"] == pytest.approx(0.05, abs=1e-7)
    assert mpo["bco/reward"] == pytest.approx(setup["reference"]["mpo"]["metrics"]["reward_mean"],
                                              rel=1e-5, abs=1e-7)


def test_frozen_reference_equal_to_policy_gives_log2(setup, layouts_results):
    expected_logprobs = setup["reference"]["logprobs"]
    mask = setup["batch"]["labels"] != -100
    seen = set()
    for r in layouts_results:
        for layout in ("pp2", "cp2"):
            frozen = r[("frozen_reference", layout)]
            assert frozen["loss"] == pytest.approx(math.log(2), abs=1e-6), layout
            assert frozen["reports"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
            assert frozen["reports"]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
            assert frozen["reports"]["rewards/accuracies"] == 0.0
            if frozen["logprobs"] is not None:  # the last pipeline stage's ranks
                err = relative_error(frozen["logprobs"][mask], expected_logprobs[mask])
                assert err < TOLERANCE, layout
                seen.add(layout)
    assert seen == {"pp2", "cp2"}


def test_bco_shift_survives_kill_and_resume(layouts_results):
    for r in layouts_results:
        straight, resumed = r["straight"], r["resumed"]
        assert straight["head"] == resumed["head"]  # exact: running mean, variance and count
        assert straight["losses"] == resumed["losses"]
        running = straight["head"]["running"]
        assert running["count"] == 4 * 2 * len(reference_pairs_of_batch())
        assert running["mean"] != 0.0 and running["var"] > 0.0
        assert straight["losses"][2] < straight["losses"][0]  # the same batch, after two steps


def reference_pairs_of_batch() -> list:
    return [role for _, roles in ROW_LAYOUTS for role in roles if role == 1]


def test_tiny_sft_then_mpo_pipeline_losses_fall(setup):
    run = setup["reference"]["pipeline"]
    assert run["sft"][-1] < 0.9 * run["sft"][0], run["sft"]
    assert run["mpo"][-1] < run["mpo"][0], run["mpo"]
    first = run["mpo_reports"][0]
    # the policy starts as its reference: DPO log 2, BCO with delta 0 twice log 2, margins 0
    assert first["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss/bco_pair"] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert run["mpo_reports"][-1]["rewards/margins"] > 0.0
    assert run["mpo_reports"][-1]["loss/sigmoid"] < math.log(2)
    assert run["delta"] != 0.0
