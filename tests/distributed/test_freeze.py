"""Freezing patterns name global layers: the same parameters freeze under every PP/VPP layout."""

from __future__ import annotations

import pytest

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_runtime import freeze_worker

PATTERNS = ["decoder.layers.1.*", "embedding.*"]


def _frozen(layout: dict, world: int) -> tuple[set, set, int]:
    results = run_workers(freeze_worker, world, layout=layout, patterns=PATTERNS)
    frozen = set().union(*(r["frozen"] for r in results))
    every = set().union(*(r["all"] for r in results))
    return frozen, every, sum(r["count"] for r in results)


@pytest.fixture(scope="module")
def single_stage():
    return _frozen({}, 1)


@pytest.mark.parametrize("layout", [{"pipeline": 2}, {"pipeline": 2, "vpp": 2}],
                         ids=["pp2", "pp2xvpp2"])
def test_freeze_patterns_match_global_layers(single_stage, layout):
    reference, reference_all, _ = single_stage
    # The reference itself: layer 1 and the embedding, nothing else.
    assert reference and all(n.startswith(("decoder.layers.1.", "embedding.")) for n in reference)
    assert any(n.startswith("embedding.") for n in reference)
    assert any(n.startswith("decoder.layers.1.") for n in reference)
    frozen, every, count = _frozen(layout, 2)
    assert every == reference_all
    assert frozen == reference
    assert count == len(reference)  # every tensor frozen on exactly one rank
