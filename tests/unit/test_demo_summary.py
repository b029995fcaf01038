"""The demo's per-stage verdicts: an RL stage is judged by its rollout batches' mean reward, read
from metrics rows that repeat a batch's reward on each of its minibatch steps."""

from __future__ import annotations

import pytest

from megatron_keye.demo.pipeline import StageSummary, rollout_rewards


def _rows(rewards_per_batch, minibatches, every=1):
    rows = []
    for b, reward in enumerate(rewards_per_batch):
        for k in range(minibatches):
            step = b * minibatches + k + 1
            if step % every == 0:
                rows.append({"step": step, "loss": 0.1 * k, "rl/reward_mean": reward})
    return rows


def test_one_reward_per_rollout_batch():
    assert rollout_rewards(_rows([0.1, 0.1, 0.3], 4), 4) == ([1, 5, 9], [0.1, 0.1, 0.3])
    # logged every 2nd step: a batch's first logged step stands for it
    assert rollout_rewards(_rows([0.1, 0.2], 4, every=2), 4) == ([2, 6], [0.1, 0.2])
    assert rollout_rewards([{"step": 1, "loss": 1.0}], 4) == ([], [])


def test_rl_stage_passes_on_a_rising_reward_whatever_its_loss():
    rising = StageSummary(name="gspo", losses=[0.0, 0.5, 0.9, 1.0], tokens_per_s=1.0,
                          skipped=0, layout="", rewards=[0.02, 0.05, 0.2, 0.25])
    assert rising.reward_halves == pytest.approx((0.035, 0.225))
    assert rising.rose and rising.passed
    assert not rising.fell
    flat = StageSummary(name="gspo", losses=[1.0, 0.5], tokens_per_s=1.0, skipped=0, layout="",
                        rewards=[0.2, 0.1, 0.2, 0.1])
    assert flat.fell and not flat.rose and not flat.passed
    sft = StageSummary(name="sft", losses=[2.0, 1.0], tokens_per_s=1.0, skipped=0, layout="")
    assert sft.passed
