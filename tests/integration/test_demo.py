"""`megatron-keye demo`, shortened: corpus -> shards -> HF import -> stage 1 -> stage 2 ->
stage 3 (CP=2 x PP=2, 4x the sequence, base 8e6) -> SFT -> MPO -> reward model; HF export and back ->
an image + video answer; the loss falls in every stage, each stage writes its loss plot, and
stage 1 trained the projector only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = {"tiny-cpu-stage1": 4, "tiny-cpu-stage2": 3, "tiny-cpu-stage3": 3, "tiny-cpu-sft": 3,
         "tiny-cpu-mpo": 3, "tiny-cpu-rm": 4}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    args = [a for recipe, n in STEPS.items() for a in ("--steps", f"{recipe}={n}")]
    done = subprocess.run([sys.executable, "-m", "megatron_keye.cli", "demo", *args,
                           "--corpus-scale", "0.25"], cwd=root, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1500)
    return root, done


def test_demo_runs_end_to_end_and_every_loss_falls(demo_run):
    root, done = demo_run
    assert done.returncode == 0, done.stdout[-5000:]
    assert "loss fell in every stage (second half's mean below the first half's): yes" in \
        done.stdout
    assert "generate the same tokens" in done.stdout
    for stage in ("stage1", "stage2", "stage3", "sft", "mpo", "rm"):
        plot = root / "outputs/demo" / stage / "loss.png"
        assert plot.stat().st_size > 1000, plot
    assert (root / "outputs/demo/hf/config.json").exists()


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
