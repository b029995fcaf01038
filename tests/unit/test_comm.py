"""Bookkeeping collectives go through one helper that puts tensors on the backend's device."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_keye.ops import collectives as comm

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_keye"
# Tensor collectives whose tensors must sit on the backend's device. (barrier and the *_object
# collectives place their own tensors.)
TENSOR_COLLECTIVES = re.compile(
    r"\bdist\.(all_reduce|all_gather|all_gather_into_tensor|reduce_scatter|"
    r"reduce_scatter_tensor|broadcast|reduce|gather|scatter|send|recv|isend|irecv)\("
)


def test_nccl_groups_communicate_on_the_current_cuda_device(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm.comm_device() == torch.device("cuda", 3)


def test_gloo_groups_communicate_on_the_cpu(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm.comm_device() == torch.device("cpu")


def test_all_reduce_values_uses_the_comm_device_and_returns_cpu(monkeypatch):
    seen = {}

    def fake_all_reduce(tensor, op=None, group=None):
        seen["device"], seen["op"] = tensor.device, op
        tensor.mul_(2)

    monkeypatch.setattr(comm, "comm_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: self)  # meta tensors stay meta
    out = comm.all_reduce_values([1.0, 2.0], op=dist.ReduceOp.MAX)
    assert seen["device"] == torch.device("meta")
    assert seen["op"] == dist.ReduceOp.MAX
    assert out.dtype == torch.float64


# Modules whose job is moving model tensors (activations, K/V, logits, vision embeddings,
# weight shards, sampled tokens, reward-model score tables): those already live on the
# compute device, which is the communication device of the model's groups.
MODEL_TENSOR_COMMUNICATION = {"ops/collectives.py", "ops/attention/context_parallel.py",
                              "heads/logprobs.py", "models/keye_vl/vision_placement.py",
                              "convert.py", "post_training/sampling.py",
                              "post_training/generation.py", "post_training/lean_decode.py",
                              "post_training/reward_model.py"}


def test_every_bookkeeping_collective_in_the_package_goes_through_comm():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if str(relative) in MODEL_TENSOR_COMMUNICATION or "testing" in relative.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if TENSOR_COLLECTIVES.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []
