"""Checkpoints under virtual pipeline stages (PP=2 x VPP=2): save, exact resume, resharding.

Each rank holds two model chunks whose modules share local names (`decoder.layers.0` in both);
the optimizer's sharded state must still find every chunk's parameters. A load runs
`roundtrip_worker`: evaluate batch 1, step on batch 2 (with the loaded Adam moments), evaluate
batch 3, which the run that saved also did right after saving.
"""

from __future__ import annotations

import pytest

from megatron_keye.testing.distributed import run_workers
from tests.distributed.conftest import random_global_batch
from tests.distributed.workers_checkpoint import refused_load_worker, roundtrip_worker

VPP = {"pipeline": 2, "vpp": 2}
FORMATS = ["fully_reshardable", "dp_reshardable"]


@pytest.fixture(scope="module")
def batches(reference_setup):
    return [random_global_batch(reference_setup["config"], rows=8, seed=200 + i) for i in range(4)]


@pytest.fixture(scope="module", params=FORMATS)
def vpp_save(request, tmp_path_factory, reference_setup, batches):
    """A PP=2 x VPP=2 run that stepped once and saved iteration 1 in the given format."""
    fmt = request.param
    path = tmp_path_factory.mktemp(f"vpp_{fmt}")
    extra = (f"checkpoint.optimizer_format={fmt}",)
    saved = run_workers(roundtrip_worker, 2, layout=VPP, weights=reference_setup["weights"],
                        batches=batches, save_dir=str(path), extra=extra)
    return {"format": fmt, "path": path, "extra": extra, "result": saved[0]}


def test_vpp_resume_is_exact(vpp_save, batches):
    """Same layout: the loaded run's next step and evaluations equal the run that saved."""
    s = vpp_save["result"]
    assert (vpp_save["path"] / "iter_0000001" / "metadata.json").exists()
    assert (vpp_save["path"] / "latest").read_text().strip() == "iter_0000001"
    (t, _) = run_workers(roundtrip_worker, 2, layout=VPP, weights=None, batches=batches,
                         load=str(vpp_save["path"]), extra=vpp_save["extra"])
    assert t["iteration"] == 1
    assert (t["eval_before"], t["step_loss"], t["eval_after"]) == (
        s["eval_before"], s["step_loss"], s["eval_after"])
    assert s["eval_after"] != pytest.approx(s["eval_before"], rel=1e-3), "the step must matter"


def test_vpp_to_one_process(vpp_save, batches):
    """fully_reshardable: model and Adam moments move to PP=1; dp_reshardable refuses the move
    for the optimizer (naming the fix) and still loads weights only."""
    s, load = vpp_save["result"], str(vpp_save["path"])
    if vpp_save["format"] == "fully_reshardable":
        (t,) = run_workers(roundtrip_worker, 1, layout={}, weights=None, batches=batches,
                           load=load, extra=vpp_save["extra"])
        assert t["iteration"] == 1
        assert t["eval_before"] == pytest.approx(s["eval_before"], rel=1e-6)
        assert t["step_loss"] == pytest.approx(s["step_loss"], rel=1e-6)
        assert t["eval_after"] == pytest.approx(s["eval_after"], rel=1e-5)
        return
    (error,) = run_workers(refused_load_worker, 1, layout={}, load=load)
    assert error is not None and "dp_reshardable" in error
    assert "checkpoint.load_weights_only=true" in error
    assert "checkpoint.optimizer_format=fully_reshardable" in error
    (t,) = run_workers(roundtrip_worker, 1, layout={}, weights=None, batches=batches, load=load,
                       extra=("checkpoint.load_weights_only=true",))
    assert t["iteration"] == 0, "weights only: training starts fresh"
    assert t["eval_before"] == pytest.approx(s["eval_before"], rel=1e-6)


def test_one_process_to_vpp(tmp_path, reference_setup, batches):
    """fully_reshardable: a PP=1 checkpoint loads into PP=2 x VPP=2 and the next step matches."""
    (s,) = run_workers(roundtrip_worker, 1, layout={}, weights=reference_setup["weights"],
                       batches=batches, save_dir=str(tmp_path))
    (t, _) = run_workers(roundtrip_worker, 2, layout=VPP, weights=None, batches=batches,
                         load=str(tmp_path))
    assert t["iteration"] == 1
    assert t["eval_before"] == pytest.approx(s["eval_before"], rel=1e-6)
    assert t["step_loss"] == pytest.approx(s["step_loss"], rel=1e-6)
    assert t["eval_after"] == pytest.approx(s["eval_after"], rel=1e-5)
    assert s["eval_after"] != pytest.approx(s["eval_before"], rel=1e-3)
