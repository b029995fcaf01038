"""Checkpoints: exact resume, other layouts, optimizer formats, crashes mid-save, keep_last,
weights-only loads, exit_at_iteration; bf16 training against fp32."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_keye.testing.distributed import run_workers
from tests.distributed.conftest import random_global_batch
from tests.distributed.workers import tiny_config, train_run_worker
from tests.distributed.workers_checkpoint import (
    crash_worker,
    precision_worker,
    refused_load_worker,
    roundtrip_worker,
    run_worker,
    weights_only_worker,
)


@pytest.fixture(scope="module")
def batches(reference_setup):
    config = reference_setup["config"]
    return [random_global_batch(config, rows=8, seed=100 + i) for i in range(8)]


def test_stopped_run_resumes_with_identical_losses(tmp_path, reference_setup, batches):
    """DP=2 with ZeRO-1: stop after step 4 (checkpoint at 3), resume, match the full run."""
    layout, weights = {"zero1": True}, reference_setup["weights"]
    full = run_workers(train_run_worker, 2, layout=layout, weights=weights, batches=batches,
                       train_iters=6)[0]["losses"]
    stopped = run_workers(train_run_worker, 2, layout=layout, weights=weights, batches=batches,
                          train_iters=6, save_dir=str(tmp_path), save_interval=3,
                          stop_after=4)[0]
    assert stopped["losses"] == full[:4]
    resumed = run_workers(train_run_worker, 2, layout=layout, weights=None, batches=batches,
                          train_iters=6, save_dir=str(tmp_path))[0]
    assert resumed["start"] == 3, "auto-resume should pick up iter 3 from `latest`"
    assert resumed["losses"] == full[3:]
    assert len(set(full)) == len(full), "losses should change from step to step"


@pytest.mark.parametrize(
    "save_layout,save_world,load_layout,load_world",
    [({"tensor": 2, "pipeline": 2}, 4, {}, 1), ({}, 1, {"tensor": 2, "pipeline": 2}, 4)],
    ids=["tp2pp2_to_tp1", "tp1_to_tp2pp2"],
)
def test_load_into_another_layout(tmp_path, reference_setup, batches, save_layout, save_world,
                                  load_layout, load_world):
    """Weights and optimizer state move between TP=2xPP=2 and one process."""
    weights = reference_setup["weights"]
    saved = run_workers(roundtrip_worker, save_world, layout=save_layout, weights=weights,
                        batches=batches, save_dir=str(tmp_path), load=None)
    loaded = run_workers(roundtrip_worker, load_world, layout=load_layout, weights=None,
                         batches=batches, save_dir=None, load=str(tmp_path))
    s, t = saved[0], loaded[0]
    assert t["iteration"] == 1
    assert t["eval_before"] == pytest.approx(s["eval_before"], rel=1e-6)
    assert t["step_loss"] == pytest.approx(s["step_loss"], rel=1e-6)
    # The step after loading uses the resharded Adam moments: same result as never moving.
    assert t["eval_after"] == pytest.approx(s["eval_after"], rel=1e-5)
    assert s["eval_after"] != pytest.approx(s["eval_before"], rel=1e-3)


CRASH_POINTS = ["writing", "before_rename", "after_rename", "pointer", "set_aside"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_during_save_leaves_latest_loadable(tmp_path, reference_setup, batches, point):
    """Die at each point of a save after a good one at iteration 2: `latest` still loads
    iteration 2 exactly, training goes on from there with the uninterrupted losses, and the next
    save clears the debris."""
    (r,) = run_workers(crash_worker, 1, point=point, weights=reference_setup["weights"],
                       batches=batches, save_dir=str(tmp_path))
    assert r["crashed"]
    assert r["latest"] == "iter_0000002"
    assert r["resumed_iteration"] == 2
    assert r["resumed_eval"] == r["eval_at_2"]
    if point == "set_aside":
        # Re-saving iteration 2 died with the old copy moved aside: `latest` names a missing
        # directory, and the copy set aside is what loads.
        assert r["crashing"] == "iter_0000002" and "iter_0000002" not in r["listing"]
        assert ".old_iter_0000002" in r["listing"] and r["resolved"] == ".old_iter_0000002"
    else:
        assert r["crashing"] == "iter_0000003" and r["resolved"] == "iter_0000002"
        # The resumed step 3 is the step 3 the crashed run took.
        assert r["resumed_loss"] == r["losses"][2]
        complete = {"writing": False, "before_rename": False, "after_rename": True,
                    "pointer": True}[point]
        assert ("iter_0000003" in r["listing"]) is complete
    assert r["latest_after"] == "iter_0000003"
    assert [n for n in r["listing_after"] if n != "logs"] == ["iter_0000002", "iter_0000003",
                                                              "latest"]


def test_config_saved_with_checkpoint(tmp_path, reference_setup, batches):
    import yaml

    run_workers(train_run_worker, 1, layout={}, weights=reference_setup["weights"],
                batches=batches, train_iters=1, save_dir=str(tmp_path))
    saved = yaml.safe_load((tmp_path / "iter_0000001" / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == tiny_config({}).model.hidden_size
    assert saved["schedule"]["train_iters"] == 1


def test_dp_reshardable(tmp_path, reference_setup, batches):
    """dp_reshardable: DP=2 (ZeRO-1) -> DP=1 loads the optimizer and the next step matches;
    a TP or PP change is refused naming the fix."""
    extra = ("checkpoint.optimizer_format=dp_reshardable",)
    (s, _) = run_workers(roundtrip_worker, 2, layout={"zero1": True},
                         weights=reference_setup["weights"], batches=batches,
                         save_dir=str(tmp_path), extra=extra)
    (t,) = run_workers(roundtrip_worker, 1, layout={"zero1": True}, weights=None,
                       batches=batches, load=str(tmp_path), extra=extra)
    assert t["iteration"] == 1
    assert t["eval_before"] == pytest.approx(s["eval_before"], rel=1e-6)
    assert t["step_loss"] == pytest.approx(s["step_loss"], rel=1e-6)
    assert t["eval_after"] == pytest.approx(s["eval_after"], rel=1e-5)
    assert s["eval_after"] != pytest.approx(s["eval_before"], rel=1e-3)
    errors = run_workers(refused_load_worker, 2, layout={"tensor": 2}, load=str(tmp_path))
    for error in errors:
        assert "dp_reshardable" in error and "'tensor': 1" in error and "'tensor': 2" in error
        assert "checkpoint.load_weights_only=true" in error
        assert "checkpoint.optimizer_format=fully_reshardable" in error


def test_load_weights_only(tmp_path, reference_setup, batches):
    """Weights come from the checkpoint; iteration, optimizer, scheduler and data start fresh,
    so the next step equals a fresh run started from those weights."""
    (saved,) = run_workers(weights_only_worker, 1, weights=reference_setup["weights"],
                           batches=batches, save_dir=str(tmp_path))
    (loaded,) = run_workers(weights_only_worker, 1, weights=None, batches=batches,
                            load=str(tmp_path))
    (fresh,) = run_workers(weights_only_worker, 1, weights=saved["params"], batches=batches)
    assert saved["iteration"] == 3 and saved["scheduler_steps"] == 3 and saved["moments"] > 0
    assert loaded["params"].keys() == saved["params"].keys()
    assert all(torch.equal(loaded["params"][k], saved["params"][k]) for k in saved["params"])
    assert (loaded["iteration"], loaded["scheduler_steps"], loaded["loader_step"],
            loaded["moments"]) == (0, 0, 0, 0)
    # warmup over 2 of 6 steps, then cosine: a fresh schedule's first step runs at lr/3,
    # iteration 4 (a quarter into the decay) at lr * (1 + cos(pi/4)) / 2
    assert loaded["lr_next"] == pytest.approx(0.01 / 3)
    assert saved["lr_next"] == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert (loaded["step_loss"], loaded["lr_next"]) == (fresh["step_loss"], fresh["lr_next"])
    assert all(torch.equal(loaded["params_after"][k], fresh["params_after"][k])
               for k in fresh["params_after"])


def test_keep_last(tmp_path, reference_setup, batches):
    """keep_last=2 with a save every step: only the two newest complete checkpoints remain,
    `latest` names the newest, and debris of an earlier crash is gone."""
    (tmp_path / ".tmp_iter_0000009").mkdir()  # a crashed save from before
    (r,) = run_workers(run_worker, 1, layout={}, weights=reference_setup["weights"],
                       batches=batches, train_iters=4, save_dir=str(tmp_path), save_interval=1,
                       extra=("checkpoint.keep_last=2",))
    assert r["iteration"] == 4
    assert [n for n in r["listing"] if n != "logs"] == ["iter_0000003", "iter_0000004", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000004"
    assert (tmp_path / "iter_0000003" / "metadata.json").exists()
    assert (tmp_path / "iter_0000004" / "metadata.json").exists()


def test_exit_at_iteration_then_resume(tmp_path, reference_setup, batches):
    """exit_at_iteration=3 of 6 stops with a checkpoint at 3; resuming completes the schedule
    with the learning rates and losses of the uninterrupted run (warmup + cosine, so the rate
    depends on the iteration)."""
    schedule = ("schedule.warmup_iters=2", "schedule.decay_style=cosine")
    weights = reference_setup["weights"]
    (full,) = run_workers(run_worker, 1, layout={}, weights=weights, batches=batches,
                          train_iters=6, extra=schedule)
    (first,) = run_workers(run_worker, 1, layout={}, weights=weights, batches=batches,
                           train_iters=6, save_dir=str(tmp_path),
                           extra=(*schedule, "schedule.exit_at_iteration=3"))
    assert first["iteration"] == 3 and len(first["losses"]) == 3
    assert (tmp_path / "latest").read_text().strip() == "iter_0000003"
    (second,) = run_workers(run_worker, 1, layout={}, weights=None, batches=batches,
                            train_iters=6, save_dir=str(tmp_path), extra=schedule)
    assert second["start"] == 3 and second["iteration"] == 6
    assert first["lrs"] + second["lrs"] == full["lrs"]
    assert first["losses"] + second["losses"] == full["losses"]
    assert len(set(full["lrs"])) == 6, "the schedule should change the rate every step"
    assert (tmp_path / "latest").read_text().strip() == "iter_0000006"


# bf16's unit roundoff (8 significant bits): the loss itself cannot be held closer than this in
# bf16. Measured: 1e-4 at step 1 growing to 1e-3 by step 4; skipping step 2's update (fp32)
# moves step 3's loss by 5.5e-3, outside it.
BF16_LOSS_RTOL = 2.0**-8


def test_bf16_training_tracks_fp32(reference_setup, batches):
    """bf16 parameters and activations (fp32 main weights in the optimizer) follow the fp32
    losses within bf16 rounding over a few steps."""
    steps = 4
    runs = {p: run_workers(precision_worker, 1, precision=p, weights=reference_setup["weights"],
                           batches=batches, steps=steps)[0] for p in ("fp32", "bf16")}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32["dtypes"] == {"torch.float32"} and bf16["dtypes"] == {"torch.bfloat16"}
    assert bf16["losses"] != fp32["losses"], "bf16 must actually run in bf16"
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=BF16_LOSS_RTOL)
