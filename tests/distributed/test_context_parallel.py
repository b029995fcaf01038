"""Context parallelism end to end: loss and every gradient equal the single process's.

The single process and every CP layout run the same random global batch through the whole
model (embedding, M-RoPE, every layer, the vocab-parallel loss) and megatron-core's gradient
reduction, so this checks the zig-zag batch split, the CP attention kernels, the loss sums over
CP ranks and the gradient all-reduce over data×context ranks together.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl.hf_adapter import split_tensor
from megatron_keye.models.keye_vl.rope import packed_text_position_ids
from megatron_keye.testing.distributed import run_workers
from tests.distributed.test_parity import TOLERANCE, relative_error
from tests.distributed.workers import grad_parity_worker

# name -> (layout, world size). CP4 with the plain ring runs on packed rows below; the kernels
# of every transport at CP2/CP4 are checked on their own in test_cp_attention.py.
LAYOUTS = {
    "cp2_p2p": ({"context": 2}, 2),
    "cp2_a2a": ({"context": 2, "cp_comm": "a2a"}, 2),
    "cp2_allgather": ({"context": 2, "cp_comm": "allgather"}, 2),
    "cp4_a2a+p2p": ({"context": 4, "cp_comm": "a2a+p2p", "cp_a2a_size": 2}, 4),
    "tp2_cp2_sp": ({"tensor": 2, "context": 2, "sp": True}, 4),
    "dp2_cp2_zero1": ({"context": 2, "zero1": True}, 4),
    # activation recompute re-runs the CP attention (and its ring) in the backward pass
    "cp2_p2p_selective_recompute": ({"context": 2, "recompute": "selective"}, 2),
    "pp2_cp2_full_recompute": ({"pipeline": 2, "context": 2, "recompute": "full"}, 4),
}


def assert_matches(name, results, reference):
    covered = set()
    for r in results:
        assert abs(r["loss"] - reference["loss"]) / abs(reference["loss"]) < TOLERANCE, name
        assert r["count"] == reference["count"], name
        for key, grad in r["grads"].items():
            expected = split_tensor(key, reference["grads"][key], r["tp_rank"], r["tp_size"])
            err = relative_error(grad, expected)
            assert err < TOLERANCE, f"{name} rank {r['rank']} {key}: relative error {err:.2e}"
            covered.add(key)
    assert covered == set(reference["grads"]), "some parameters were held by no rank"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_matches_single_process(name, reference_setup, single_process_reference):
    layout, world = LAYOUTS[name]
    results = run_workers(grad_parity_worker, world, layout=layout,
                          weights=reference_setup["weights"], batch=reference_setup["batch"])
    assert_matches(name, results, single_process_reference)


def packed(batch: dict) -> dict:
    """The same tokens as rows of three samples each ([8, 16, 8] tokens: multiples of 2 x CP=4)."""
    rows, seq = batch["tokens"].shape
    sample_ids = torch.tensor([0] * 8 + [1] * 16 + [2] * 8).repeat(rows, 1)
    return {**batch, "sample_ids": sample_ids,
            "position_ids": packed_text_position_ids(sample_ids)}


@pytest.fixture(scope="module")
def packed_reference(reference_setup):
    (result,) = run_workers(grad_parity_worker, 1, layout={},
                            weights=reference_setup["weights"],
                            batch=packed(reference_setup["batch"]))
    return result


PACKED_LAYOUTS = {**LAYOUTS, "cp4_p2p": ({"context": 4}, 4)}


@pytest.mark.parametrize("name", ["cp2_p2p", "cp4_p2p", "cp2_a2a", "cp2_allgather"])
def test_packed_rows_under_context_parallel(name, reference_setup, packed_reference,
                                             single_process_reference):
    layout, world = PACKED_LAYOUTS[name]
    results = run_workers(grad_parity_worker, world, layout=layout,
                          weights=reference_setup["weights"],
                          batch=packed(reference_setup["batch"]))
    assert_matches(name, results, packed_reference)
    # packing changed the math (samples no longer see each other): the test can fail
    assert abs(packed_reference["loss"] - single_process_reference["loss"]) > 1e-4


def test_kill_and_resume_at_cp2_gives_identical_losses(tmp_path, reference_setup):
    from tests.distributed.conftest import random_global_batch
    from tests.distributed.workers import train_run_worker

    config = reference_setup["config"]
    batches = [random_global_batch(config, rows=8, seed=200 + i) for i in range(5)]
    layout, weights = {"context": 2}, reference_setup["weights"]
    full = run_workers(train_run_worker, 2, layout=layout, weights=weights, batches=batches,
                       train_iters=5)[0]["losses"]
    stopped = run_workers(train_run_worker, 2, layout=layout, weights=weights, batches=batches,
                          train_iters=5, save_dir=str(tmp_path), save_interval=2,
                          stop_after=3)[0]
    assert stopped["losses"] == full[:3]
    resumed = run_workers(train_run_worker, 2, layout=layout, weights=None, batches=batches,
                          train_iters=5, save_dir=str(tmp_path))[0]
    assert resumed["start"] == 2
    assert resumed["losses"] == full[2:]


def test_short_context_checkpoint_extends_to_long_context_cp2(tmp_path, reference_setup):
    """Stage 3: an 8K-stage checkpoint loaded at twice the length, RoPE base 1e6 -> 8e6, into
    TP=2xCP=2 (weights) and PP=2xCP=2 (weights and Adam state) gives the losses those weights
    and that optimizer state give unsharded with the new base, before and after a step."""
    from tests.distributed.conftest import random_global_batch
    from tests.distributed.workers import tiny_config, train_run_worker
    from tests.distributed.workers_cp_model import extension_eval_worker, extension_step_worker

    config = reference_setup["config"]  # seq 32, base 1e6
    short = [random_global_batch(config, rows=8, seed=300 + i) for i in range(2)]
    run_workers(train_run_worker, 1, layout={}, weights=reference_setup["weights"],
                batches=short, train_iters=2, save_dir=str(tmp_path))
    long_batch = random_global_batch(tiny_config({}, seq=64), rows=8, seed=301)
    common = {"load": str(tmp_path), "batch": long_batch, "seq": 64}
    (one,) = run_workers(extension_step_worker, 1, layout={}, rope_base=8e6,
                         weights_only=False, **common)
    assert one["iteration"] == 2  # the checkpoint's iteration (and schedule) were restored
    cp_tp = run_workers(extension_eval_worker, 4, layout={"context": 2, "tensor": 2, "sp": True},
                        rope_base=8e6, **common)
    for r in cp_tp:
        assert abs(r["loss"] - one["before"]) / one["before"] < TOLERANCE
        assert r["count"] == one["count"]
    cp_pp = run_workers(extension_step_worker, 4, layout={"context": 2, "pipeline": 2},
                        rope_base=8e6, weights_only=False, **common)
    for r in cp_pp:
        for key in ("before", "step", "after"):
            assert abs(r[key] - one[key]) / one[key] < TOLERANCE, key
    # The Adam moments really were loaded (a fresh optimizer steps elsewhere), and the base
    # really changed the model.
    (fresh,) = run_workers(extension_step_worker, 1, layout={}, rope_base=8e6,
                           weights_only=True, **common)
    assert abs(fresh["after"] - one["after"]) / one["after"] > 1e-4
    (old_base,) = run_workers(extension_eval_worker, 1, layout={}, rope_base=1e6, **common)
    assert abs(old_base["loss"] - one["before"]) > 1e-5


def test_recompute_reruns_core_attention_in_backward(reference_setup):
    """Recompute really happens (parity alone cannot tell): each layer's core attention runs
    once more in the backward pass under selective (attention only) and full recompute."""
    from tests.distributed.workers_cp_model import attention_calls_worker

    rows = {k: (v[:, :2] if k == "position_ids" else v[:2])
            for k, v in reference_setup["batch"].items()}
    (calls,) = run_workers(attention_calls_worker, 1, modes=["none", "selective", "full"],
                           batch=rows)
    layers = reference_setup["config"].model.num_layers
    assert calls == {"none": layers, "selective": 2 * layers, "full": 2 * layers}
