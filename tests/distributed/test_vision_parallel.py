"""Vision tower + projector under tensor parallelism equal one process (fp32, relative <= 1e-5).

One spawned world of two gloo ranks runs TP=1 (each rank alone), then TP=2 without and with
sequence parallelism, on the same random weights (biases and norms included) and inputs: two
images of different sizes and a video with slow and fast frames. Outputs and every tower and
projector gradient (after the tensor-parallel reduction `finalize_model_grads` does, pieces
gathered) must match TP=1 on both ranks; a tower-only input with an odd patch count exercises
the sequence-parallel padding. The same world also runs the tower with vision.recompute=full
at TP=1 and TP=2: outputs, loss and every gradient equal recompute=none (<= 1e-6) and the
forward saves fewer bytes.
"""

from __future__ import annotations

import pytest
import torch

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_vision import full_vision_weights, vision_case, vision_worker

TOLERANCE = 1e-5
LAYOUTS = [
    {"name": "tp1", "tensor": 1},
    {"name": "tp1-full", "tensor": 1, "recompute": "full"},
    {"name": "tp2", "tensor": 2},
    {"name": "tp2-full", "tensor": 2, "recompute": "full"},
    {"name": "tp2-sp", "tensor": 2, "sequence_parallel": True},
]


@pytest.fixture(scope="module")
def results():
    return run_workers(vision_worker, 2, layouts=LAYOUTS, case=vision_case(),
                       weights=full_vision_weights())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
def test_tensor_parallel_equals_one_process(results, layout):
    reference = results[0]["tp1"]
    assert set(reference["grads"]) == set(full_vision_weights())
    for rank, per_rank in enumerate(results):
        got = per_rank[layout]
        assert got["empty_shape"] == reference["empty_shape"] == (0, 40)
        for key in ("features", "embeddings", "odd_features", "odd_pixel_grad"):
            assert got[key].shape == reference[key].shape, (rank, key)
            assert _relative(got[key], reference[key]) <= TOLERANCE, (rank, key)
        for name, grad in reference["grads"].items():
            assert grad.norm() > 0, name
            assert _relative(got["grads"][name], grad) <= TOLERANCE, (rank, layout, name)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_full_recompute_equals_no_recompute_and_saves_less(results, layout):
    """vision.recompute=full re-runs each ViT layer in the backward pass: the same outputs, loss
    and gradients (fp32, <= 1e-6 relative) with fewer bytes saved by the forward."""
    for rank, per_rank in enumerate(results):
        plain, full = per_rank[layout], per_rank[f"{layout}-full"]
        for key in ("features", "embeddings", "loss", "odd_features", "odd_pixel_grad",
                    "perturbed_features", "perturbed_embeddings"):
            assert _relative(full[key], plain[key]) <= 1e-6, (rank, layout, key)
        assert set(full["grads"]) == set(plain["grads"])
        for name, grad in plain["grads"].items():
            assert grad.norm() > 0, name
            assert _relative(full["grads"][name], grad) <= 1e-6, (rank, layout, name)
        assert full["saved_bytes"] < 0.7 * plain["saved_bytes"], (rank, layout)


def test_per_name_init_is_the_same_at_every_tensor_parallel_degree(results):
    reference = results[0]["tp1"]["init"]
    matrices = [name for name, value in reference.items() if value.dim() >= 2]
    assert len(matrices) >= 8
    assert not torch.equal(reference["vision.encoder.layers.0.mlp.linear_fc1.weight"],
                           reference["vision.encoder.layers.1.mlp.linear_fc1.weight"])
    for per_rank in results:
        for layout in ("tp2", "tp2-sp"):
            init = per_rank[layout]["init"]
            assert set(init) == set(reference)
            for name, value in reference.items():
                assert torch.equal(init[name], value), (layout, name)
