"""The one-GPU check (tools/gpu_check.sh) as a test: skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_tiny_flavor_trains_matches_cpu_and_resumes_in_bf16(tmp_path):
    from megatron_keye.bench.gpu_check import main

    assert main(["--flavors", "tiny", "--backends", "sdpa", "--workdir", str(tmp_path)]) == 0


def test_every_installed_backend_on_both_flavors(tmp_path):
    from megatron_keye.bench.gpu_check import main

    assert main(["--flavors", "tiny,small", "--workdir", str(tmp_path)]) == 0


def test_this_gpu_has_a_published_peak_or_says_none():
    from megatron_keye.runtime.metrics import published_bf16_peak

    peak = published_bf16_peak(torch.cuda.get_device_name())
    assert peak is None or 1e13 < peak < 1e16
