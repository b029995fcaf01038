"""`megatron-keye demo`, shortened: corpus -> shards -> HF import -> stage 1 -> stage 2 ->
stage 3 (CP=2 x PP=2, 4x the sequence, base 8e6) -> SFT -> MPO -> reward model -> GSPO (band counts
of images and sums, 6 rollout batches); HF export of the GSPO policy and back -> an image + video
answer; the loss falls in every stage but GSPO, GSPO's mean reward rises (second half of its
rollout batches above the first: robust from 6 batches on, over rollout seeds 0-3), each stage
writes its loss plot and GSPO its reward plot, and stage 1 trained the projector only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = {"tiny-cpu-stage1": 4, "tiny-cpu-stage2": 3, "tiny-cpu-stage3": 3, "tiny-cpu-sft": 3,
         "tiny-cpu-mpo": 3, "tiny-cpu-rm": 4, "tiny-cpu-gspo": 24}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    args = [a for recipe, n in STEPS.items() for a in ("--steps", f"{recipe}={n}")]
    done = subprocess.run([sys.executable, "-m", "megatron_keye.cli", "demo", *args,
                           "--corpus-scale", "0.25"], cwd=root, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1500)
    return root, done


def test_demo_runs_end_to_end_every_loss_falls_and_the_reward_rises(demo_run):
    root, done = demo_run
    assert done.returncode == 0, done.stdout[-5000:]
    assert ("loss fell in every stage but GSPO (second half's mean below the first half's): yes"
            in done.stdout)
    assert "generate the same tokens" in done.stdout
    for stage in ("stage1", "stage2", "stage3", "sft", "mpo", "rm", "gspo"):
        plot = root / "outputs/demo" / stage / "loss.png"
        assert plot.stat().st_size > 1000, plot
    assert (root / "outputs/demo/gspo/reward.png").stat().st_size > 1000
    assert (root / "outputs/demo/hf/config.json").exists()


def test_gspo_reward_rises_on_image_and_text_prompts(demo_run):
    root, done = demo_run
    assert done.returncode == 0
    rows = [json.loads(line) for line in
            (root / "outputs/demo/gspo/metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, STEPS["tiny-cpu-gspo"] + 1))
    rewards = [r["rl/reward_mean"] for r in rows[::4]]  # 4 minibatches per rollout batch
    first, second = sum(rewards[:3]) / 3, sum(rewards[3:]) / 3
    assert second > first, rewards
    line = (f"reward rose in gspo (mean of the last 3 rollout batches {second:.3f} vs the first 3 "
            f"{first:.3f}): yes")
    assert line in done.stdout
    summary = next(s for s in done.stdout.splitlines() if s.startswith("gspo "))
    assert f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f}" in " ".join(summary.split())
    # the rollouts answered image prompts (band counts) as well as sums
    assert any("rl/reward/count_mean" in r for r in rows)
    assert any("rl/reward/arithmetic_mean" in r for r in rows)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from megatron_keye.post_training.merging import load_full_weights
    from megatron_keye.runtime.parallel import ParallelDims

    ParallelDims().initialize(seed=0)
    return load_full_weights(str(checkpoint))[1]


def test_stage1_trained_the_projector_only(demo_run):
    from megatron_keye.testing.distributed import run_workers

    root, done = demo_run
    assert done.returncode == 0
    (before,) = run_workers(_weights, 1, checkpoint=root / "outputs/demo/init")
    (after,) = run_workers(_weights, 1, checkpoint=root / "outputs/demo/stage1/checkpoints")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("projector.") for k in moved), sorted(moved)
    assert any(k.startswith("vision.") for k in before)
