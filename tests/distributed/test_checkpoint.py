"""Checkpoints: exact resume, loading into another layout, and surviving a crash mid-save."""

from __future__ import annotations

import pytest

from megatron_keye.testing.distributed import run_workers
from tests.distributed.conftest import random_global_batch
from tests.distributed.workers import (
    crash_during_save_worker,
    reshard_worker,
    tiny_config,
    train_run_worker,
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
    saved = run_workers(reshard_worker, save_world, layout=save_layout, weights=weights,
                        batches=batches, save_dir=str(tmp_path), load=None)
    loaded = run_workers(reshard_worker, load_world, layout=load_layout, weights=None,
                         batches=batches, save_dir=None, load=str(tmp_path))
    s, t = saved[0], loaded[0]
    assert t["iteration"] == 1
    assert t["eval_before"] == pytest.approx(s["eval_before"], rel=1e-6)
    # The step after loading uses the resharded Adam moments: same result as never moving.
    assert t["eval_after"] == pytest.approx(s["eval_after"], rel=1e-5)
    assert s["eval_after"] != pytest.approx(s["eval_before"], rel=1e-3)


def test_crash_during_save_leaves_latest_loadable(tmp_path, reference_setup, batches):
    (r,) = run_workers(crash_during_save_worker, 1, weights=reference_setup["weights"],
                       batches=batches, save_dir=str(tmp_path))
    assert r["crashed"]
    assert r["latest"] == "iter_0000002"
    assert "iter_0000003" not in r["listing"]
    assert r["resumed_eval"] == r["saved_eval"]
    assert r["listing_after"] == ["iter_0000002", "iter_0000005", "latest"]


def test_config_saved_with_checkpoint(tmp_path, reference_setup, batches):
    import yaml

    run_workers(train_run_worker, 1, layout={}, weights=reference_setup["weights"],
                batches=batches, train_iters=1, save_dir=str(tmp_path))
    saved = yaml.safe_load((tmp_path / "iter_0000001" / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == tiny_config({}).model.hidden_size
    assert saved["schedule"]["train_iters"] == 1
