"""Keye-VL end to end on the parallel runtime: every layout equals one process (fp32, rel 1e-5),
gradients of the vision tower and projector included; a batch without images; a pad-count
mismatch names the row; stage-1 freezing trains the projector only.

The batch is built by the front end (image pipeline, vision tokens, tokenizer) from synthetic
media: two images of different sizes and a video with slow and fast frames, in two rows. One
spawned world per world size runs all of its cases.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.models.keye_vl.hf_adapter import hf_to_native, split_tensor
from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_keye_vl import (
    demo_batch,
    layouts_worker,
    random_hf_state,
    single_process_worker,
    text_batch,
    vl_config,
)

TOLERANCE = 1e-5
VISION_PREFIXES = ("vision.", "projector.")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def doubled(batch: dict) -> dict:
    """The batch twice over (4 rows): the same mean loss and gradients, for DP=2 x 2 micro-batches."""
    out = {}
    for key, value in batch.items():
        out[key] = torch.cat([value, value], dim=1 if key == "position_ids" else 0)
    return out


@pytest.fixture(scope="module")
def setup():
    config = vl_config({})
    hf = random_hf_state(config.model)
    weights = {k: v.clone() for k, v in hf_to_native(hf, config.model).items()}
    return {"config": config, "hf": hf, "weights": weights, "batch": demo_batch()}


@pytest.fixture(scope="module")
def single(setup):
    (result,) = run_workers(single_process_worker, 1, weights=setup["weights"],
                            batch=setup["batch"], mismatch=demo_batch(drop_pad_in_row=0),
                            text=text_batch())
    return result


def test_batch_has_images_and_slow_fast_video(setup):
    grids = setup["batch"]["vision_grids"].tolist()
    assert grids[:2] == [[1, 4, 6], [1, 2, 4]]  # two images of different sizes
    assert grids[2:] == [[1, 4, 4], [1, 2, 2], [1, 4, 4], [1, 2, 2]]  # slow, fast, slow, fast


def test_reference_has_vision_gradients(single):
    grads = single["reference"]["grads"]
    vision = [k for k in grads if k.startswith(VISION_PREFIXES)]
    assert any(k.startswith("vision.encoder.layers.") for k in vision)
    assert any(k.startswith("projector.") for k in vision)
    for key in vision:
        assert grads[key].norm() > 0, key


def test_batch_without_images_trains(single):
    result = single["text_only"]
    assert result["count"] > 0 and torch.isfinite(torch.tensor(result["loss"]))
    for key, grad in result["grads"].items():
        if key.startswith(VISION_PREFIXES):
            assert torch.count_nonzero(grad) == 0, key
        elif key.startswith("decoder.layers.0."):
            assert grad.norm() > 0, key


def test_pad_count_mismatch_names_the_row(single):
    message = single["mismatch_error"]
    assert "batch row 0" in message and "vision item 0" in message


def test_stage1_freezing_trains_the_projector_only(single):
    before, after = single["freeze"]["before"], single["freeze"]["after"]
    assert set(before) == set(after)
    for key in before:
        if key.startswith("projector."):
            assert not torch.equal(before[key], after[key]), f"{key} did not move"
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed"


CASES = {
    "tp2_pp2": {"tensor": 2, "pipeline": 2},
    "cp2_tp2_sp": {"context": 2, "tensor": 2, "sp": True},
    "pp2_vpp2_dp2": {"pipeline": 2, "vpp": 2, "micro_batch": 1},
}


@pytest.fixture(scope="module")
def layouts(setup):
    batches = {name: doubled(setup["batch"]) if name == "pp2_vpp2_dp2" else setup["batch"]
               for name in CASES}
    per_rank = run_workers(layouts_worker, 4, cases=CASES, weights=setup["weights"],
                           batches=batches, timeout=600)
    return {name: [r[name] for r in per_rank] for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_layout_matches_single_process(name, layouts, single):
    ref = single["reference"]
    covered = set()
    for r in layouts[name]:
        assert abs(r["loss"] - ref["loss"]) / abs(ref["loss"]) < TOLERANCE
        for key, grad in r["grads"].items():
            if key.startswith(VISION_PREFIXES):
                assert r["pp_rank"] == 0, f"{key} lives on pipeline rank {r['pp_rank']}"
            expected = split_tensor(key, ref["grads"][key], r["tp_rank"], r["tp_size"])
            assert grad.shape == expected.shape, key
            err = relative_error(grad, expected)
            assert err < TOLERANCE, f"{name} rank {r['rank']} {key}: relative error {err:.2e}"
            covered.add(key)
    assert covered == set(ref["grads"]), "some parameters were held by no rank"
