"""Post-training heads on one process: vocab-parallel log-probs/entropy against log_softmax, SFT
sample/square weights against hand-computed values, preference losses against the plain-torch
formulas (gradients included), DPO with policy = reference, the Welford shift, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_keye.config.schema import HeadConfig, PreferenceHeadConfig, SFTHeadConfig
from megatron_keye.heads import build_loss_head
from megatron_keye.heads.logprobs import vocab_parallel_logprobs
from megatron_keye.heads.preference import RunningMoments
from tests.distributed.workers_heads import reference_preference_loss, reference_token_logprobs

VOCAB, PADDED = 13, 16


def test_logprobs_and_entropy_match_log_softmax_out_of_place():
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.7):
        logits = torch.randn(6, 3, PADDED, generator=g)
        logits[..., VOCAB:] = torch.finfo(torch.float32).min  # the model's padding mask
        logits.requires_grad_(True)
        before = logits.detach().clone()
        labels = torch.randint(0, VOCAB, (3, 6), generator=g)
        labels[0, 2] = -100
        logp, entropy = vocab_parallel_logprobs(logits, labels.T, vocab_size=VOCAB,
                                                temperature=temperature)
        ref_logp, ref_entropy = reference_token_logprobs(logits, labels, VOCAB, temperature)
        torch.testing.assert_close(logp.T, ref_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entropy.T, ref_entropy, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(entropy).all()
        w1, w2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
        ours = torch.autograd.grad((logp * w1 + entropy * w2).sum(), logits)[0]
        theirs = torch.autograd.grad((ref_logp.T * w1 + ref_entropy.T * w2).sum(), logits)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert ours[..., VOCAB:].abs().max() == 0  # padded columns get no gradient
        assert torch.equal(logits.detach(), before)  # out of place
        ref_logp, _ = reference_token_logprobs(logits, labels, VOCAB, temperature)
        theirs = torch.autograd.grad((ref_logp.T * w1).sum(), logits)[0]
        for with_entropy in (True, False):  # only log p used: the entropy's gradient is None
            logp, entropy = vocab_parallel_logprobs(logits, labels.T, vocab_size=VOCAB,
                                                    temperature=temperature,
                                                    with_entropy=with_entropy)
            ours = torch.autograd.grad((logp * w1).sum(), logits)[0]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            assert with_entropy or not entropy.any()


def test_logprobs_of_bf16_logits_are_fp32_and_leave_the_input():
    logits = torch.randn(4, 2, VOCAB).bfloat16()
    before = logits.clone()
    logp, _ = vocab_parallel_logprobs(logits, torch.zeros(4, 2, dtype=torch.long))
    assert logp.dtype == torch.float32 and torch.equal(logits, before)


def sft_batch():
    """One row: sample 0 trains 3 tokens (weights 1, 1, 0.5), sample 1 trains 1 token."""
    labels = torch.tensor([[1, 2, 3, 4, -100, 5, 6, 7]])
    weights = torch.tensor([[0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.0]])
    ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    return {"labels": labels, "loss_weights": weights, "sample_ids": ids}


@pytest.mark.parametrize("loss_avg", ["token", "sample", "square"])
def test_sft_weights_match_hand_computed_values(loss_avg):
    g = torch.Generator().manual_seed(1)
    batch = sft_batch()
    logits = torch.randn(8, 1, VOCAB, generator=g, requires_grad=True)
    nll = -reference_token_logprobs(logits.detach(), batch["labels"], VOCAB)[0][0]
    a, b, c, d = nll[1], nll[2], nll[3], nll[6]  # the trained tokens
    f0, f1 = {"token": (1.0, 1.0), "sample": (1 / 3, 1.0),
              "square": (1 / math.sqrt(3), 1.0)}[loss_avg]
    expected = (f0 * (a + b + 0.5 * c) + f1 * d) / (f0 * 2.5 + f1)
    head = build_loss_head("sft", head_config=HeadConfig(sft=SFTHeadConfig(loss_avg=loss_avg)),
                           vocab_size=VOCAB)
    # the global batch = this micro-batch twice: weights normalize over both
    stats = head.batch_statistics(batch)
    head.begin_step({k: 2 * v for k, v in stats.items()})
    total, count, _ = head(logits, batch)
    assert int(count) == 4
    assert (2 * total / (2 * count)).item() == pytest.approx(expected.item(), rel=1e-6)


def pair_batch(g):
    """Row 0: chosen (6) + rejected (6) + padding (4); row 1: two pairs of 4 tokens."""
    ids = torch.tensor([[0] * 6 + [1] * 6 + [2] * 4, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4])
    role = torch.tensor([[1] * 6 + [2] * 6 + [0] * 4, [1] * 4 + [2] * 4 + [1] * 4 + [2] * 4])
    weights = (role > 0).float()
    weights[:, 0] = 0.0  # a prompt token
    labels = torch.randint(0, VOCAB, (2, 16), generator=g)
    return {"labels": labels, "loss_weights": weights, "sample_ids": ids, "pair_role": role,
            "ref_logprobs": -torch.rand(2, 16, generator=g) * 3}


CASES = [
    ("dpo", PreferenceHeadConfig(beta=0.2, label_smoothing=0.15), {"sigmoid": 1.0}, 0.0),
    ("dpo", PreferenceHeadConfig(beta=0.4, loss_types=["ipo"]), {"ipo": 1.0}, 0.0),
    ("dpo", PreferenceHeadConfig(beta=0.3, loss_types=["bco_pair"]), {"bco_pair": 1.0}, 0.2),
    ("mpo", PreferenceHeadConfig(), {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}, -0.1),
    ("mpo", PreferenceHeadConfig(loss_weights=[0.5, 0.3, 2.0]),
     {"sigmoid": 0.5, "bco_pair": 0.3, "sft": 2.0}, 0.0),
]


@pytest.mark.parametrize("name,config,terms,delta", CASES)
def test_preference_losses_match_the_formulas(name, config, terms, delta):
    g = torch.Generator().manual_seed(2)
    batch = pair_batch(g)
    logits = torch.randn(16, 2, VOCAB, generator=g, requires_grad=True)
    head = build_loss_head(name, head_config=HeadConfig(preference=config), vocab_size=VOCAB)
    head.running.load_state_dict({"mean": delta, "var": 0.0, "count": 3.0})
    head.begin_step(head.batch_statistics(batch))
    total, count, report = head(logits, batch)
    assert int(count) == 3
    expected = reference_preference_loss(logits, batch, VOCAB, terms=terms, beta=config.beta,
                                         label_smoothing=config.label_smoothing, delta=delta)
    assert (total / count).item() == pytest.approx(expected["loss"].item(), rel=1e-6)
    ours = torch.autograd.grad(total / count, logits)[0]
    theirs = torch.autograd.grad(expected["loss"], logits)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for key, name_ in (("rewards/chosen", "chosen"), ("rewards/margins", "margins"),
                       ("rewards/accuracies", "accuracy")):
        s, c = report[key].tolist()
        assert s / c == pytest.approx(expected[name_], rel=1e-6, abs=1e-7)


def test_dpo_with_policy_equal_to_reference_is_log2():
    g = torch.Generator().manual_seed(3)
    batch = pair_batch(g)
    logits = torch.randn(16, 2, VOCAB, generator=g)
    batch["ref_logprobs"] = reference_token_logprobs(logits, batch["labels"], VOCAB)[0]
    head = build_loss_head("dpo", vocab_size=VOCAB)
    head.begin_step(head.batch_statistics(batch))
    total, count, report = head(logits, batch)
    assert (total / count).item() == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(report[key][0].item()) < 1e-5, key


def test_running_moments_equal_the_statistics_of_everything_seen():
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(n, generator=g) * 2 + 1).double() for n in (6, 10, 3)]
    running = RunningMoments()
    for b in batches:
        running.update(b.sum().item(), (b * b).sum().item(), b.numel())
    every = torch.cat(batches).double()
    assert running.mean == pytest.approx(every.mean().item(), rel=1e-9)
    assert running.var == pytest.approx(every.var(unbiased=False).item(), rel=1e-6)
    assert running.count == every.numel()
    restored = RunningMoments()
    restored.load_state_dict(running.state_dict())
    assert restored.state_dict() == running.state_dict()


def test_bco_shift_updates_from_global_reports():
    head = build_loss_head("mpo", vocab_size=VOCAB)
    head.end_step({"bco/reward": (3.0, 6.0), "bco/reward_sq": (5.0, 6.0)}, training=True)
    assert head.state_dict()["running"] == {"mean": 0.5, "var": pytest.approx(5 / 6 - 0.25),
                                            "count": 6.0}
    head.end_step({"bco/reward": (3.0, 6.0), "bco/reward_sq": (5.0, 6.0)}, training=False)
    assert head.state_dict()["running"]["count"] == 6.0  # evaluation leaves it alone


def test_bad_pairs_and_options_are_named():
    g = torch.Generator().manual_seed(5)
    batch = pair_batch(g)
    batch["pair_role"] = batch["pair_role"].clone()
    batch["pair_role"][1, 4:8] = 1  # two chosen in a row
    head = build_loss_head("dpo", vocab_size=VOCAB)
    head.begin_step(head.batch_statistics(batch))
    with pytest.raises(ValueError, match="row 1 is not followed by a rejected"):
        head(torch.randn(16, 2, VOCAB), batch)
    del batch["ref_logprobs"]
    with pytest.raises(ValueError, match="ref_logprobs"):
        head(torch.randn(16, 2, VOCAB), batch)
    with pytest.raises(ValueError, match="loss_weights: 1 weight"):
        build_loss_head("mpo", head_config=HeadConfig(
            preference=PreferenceHeadConfig(loss_weights=[1.0])))
    with pytest.raises(ValueError, match="stage.loss_head: unknown head"):
        build_loss_head("nope")
