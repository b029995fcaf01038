"""Published BF16 peaks by CUDA device name (the MFU denominator on GPUs)."""

from __future__ import annotations

import pytest

from megatron_keye.runtime.metrics import published_bf16_peak


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA H800", 989.4),
    ("NVIDIA H20", 148),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A10", 125),
    ("NVIDIA A30", 165),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA L4", 121),
    ("NVIDIA B200", 2250),
    ("NVIDIA GB200", 2500),
    ("AMD Instinct MI300X", 1307.4),
])
def test_published_peaks(name, tflops):
    assert published_bf16_peak(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", [
    "NVIDIA A10G",          # not the A10: no guess
    "Tesla V100-SXM2-16GB",  # no BF16 tensor cores
    "Tesla T4",
    "NVIDIA GeForce RTX 4090",
    "cpu",
    "",
])
def test_unknown_devices_have_no_published_peak(name):
    assert published_bf16_peak(name) is None
