"""ParallelDims: the one place that decides devices, backends, process groups and seeds.

Everything else asks it (or megatron-core's `parallel_state`, which it initializes) for ranks
and groups; nothing else calls `init_process_group` or picks a device.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_keye.config.schema import ParallelConfig
from megatron_keye.config.validation import data_parallel_size
from megatron_keye.runtime import cpu_compat, mcore_fallback


@dataclass(kw_only=True, frozen=True)
class ParallelDims:
    """Parallel degrees of a run. `world_size == tensor * pipeline * context * data`."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    context: int = 1
    data: int = 1

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> ParallelDims:
        """Degrees from the config, with `data` derived from the world size when it is 0."""
        return cls(
            tensor=config.tensor,
            pipeline=config.pipeline,
            virtual_pipeline=config.virtual_pipeline,
            context=config.context,
            data=data_parallel_size(config, world_size),
        )

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data

    @property
    def vpp(self) -> int | None:
        """megatron-core's virtual pipeline size (None when not interleaving)."""
        return self.virtual_pipeline if self.virtual_pipeline > 1 else None

    def initialize(self, *, seed: int, timeout_minutes: float = 30.0) -> torch.device:
        """Start torch.distributed (if needed) and megatron-core's parallel state; seed RNGs.

        Returns the device this process computes on.
        """
        from megatron.core import parallel_state, tensor_parallel

        device = init_distributed(timeout_minutes=timeout_minutes)
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"parallel: {dist.get_world_size()} processes were started but the layout "
                f"{self} needs {self.world_size}"
            )
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tensor,
            pipeline_model_parallel_size=self.pipeline,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.context,
        )
        # Pipeline stages hold different layers; offset their seeds so they do not initialize
        # identically (megatron's convention). TP ranks share the seed; the TP RNG tracker gives
        # each its own stream for sharded weights.
        stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
        random.seed(stage_seed)
        np.random.seed(stage_seed % (2**32))
        torch.manual_seed(stage_seed)
        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
        return device


def compute_device() -> torch.device:
    """The device of this process: its local GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(*, timeout_minutes: float = 30.0) -> torch.device:
    """Initialize the default process group (nccl with CUDA, gloo without) and CPU shims.

    Under torchrun/srun the rendezvous comes from the environment; a plain `python` process
    becomes a world of one on a free local port, so tools and tests need no launcher.
    """
    device = compute_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cpu_compat.apply()
    mcore_fallback.apply()
    if not dist.is_initialized():
        if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
            _env_from_slurm()
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
            )
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return device


def _env_from_slurm() -> None:
    """Map `srun`'s variables to torch's when launched without torchrun (one task per GPU)."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        os.environ["MASTER_ADDR"] = nodelist.split(",")[0].split("[")[0]


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Tear down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
