"""ParallelDims: the one place that decides devices, backends, process groups and seeds.

Everything else asks it (or megatron-core's `parallel_state`, which it initializes) for ranks
and groups; nothing else calls `init_process_group` or picks a device.
"""

from __future__ import annotations

import datetime
import os
import random
import shutil
import socket
import subprocess
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
    """The device of this process: its local GPU under CUDA, else the CPU.

    The GPU is `LOCAL_RANK` among the visible ones, modulo their number: a launcher that binds
    one GPU per task (`srun --gpus-per-task=1`) leaves each process a single visible device 0.
    The launcher's environment must be in place first (`init_distributed` sees to it).
    """
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(*, timeout_minutes: float = 30.0) -> torch.device:
    """Initialize the default process group (nccl with CUDA, gloo without) and CPU shims.

    Under torchrun the rendezvous comes from the environment, under a bare `srun` from slurm's
    variables (mapped before the device is chosen, so each task takes its own GPU); a plain
    `python` process becomes a world of one on a free local port, so tools and tests need no
    launcher.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
            _env_from_slurm()
        if "RANK" not in os.environ:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
            )
    device = compute_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cpu_compat.apply()
    mcore_fallback.apply()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return device


def _env_from_slurm() -> None:
    """Map `srun`'s variables to torch's when launched without torchrun (one task per GPU)."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault(
        "WORLD_SIZE", os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS", "1")
    )
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        # Rank 0 runs on the first node of this job step, which need not be the job's first
        # node (`srun --relative`, a step on a subset of the allocation).
        nodelist = next((os.environ[k] for k in
                         ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if os.environ.get(k)), None)
        os.environ["MASTER_ADDR"] = slurm_hostnames(nodelist)[0] if nodelist else "127.0.0.1"


def slurm_hostnames(hostlist: str) -> list[str]:
    """Every host of a slurm hostlist, in order: `scontrol show hostnames` when it is on PATH
    (slurm's own reading), else `expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            done = subprocess.run(
                [scontrol, "show", "hostnames", hostlist],
                capture_output=True, text=True, timeout=60, check=True,
            )
        except (OSError, subprocess.SubprocessError):
            pass  # e.g. no slurm controller reachable: read the list ourselves
        else:
            hosts = done.stdout.split()
            if hosts:
                return hosts
    return expand_hostlist(hostlist)


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a slurm hostlist expression into host names, in slurm's order.

    Handles comma-separated groups with different prefixes (`gpu-a[01-03,07],gpu-b[10-11],login1`),
    ranges and single numbers inside brackets, zero padding (the width of a range's first bound:
    `[08-10]` gives 08, 09, 10; `[8-10]` gives 8, 9, 10), text after a bracket, and several
    brackets in one name (`n[1-2]-ib[3-4]`: every combination, the first bracket varying
    slowest). Anything else raises ValueError naming the expression.
    """
    text = hostlist.strip()
    if not text:
        raise ValueError("slurm hostlist is empty")
    hosts: list[str] = []
    for item in _split_top_level(text, hostlist):
        hosts.extend(_expand_host(item, hostlist))
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"slurm hostlist {whole!r}: nested '['")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"slurm hostlist {whole!r}: ']' without '['")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"slurm hostlist {whole!r}: '[' without ']'")
    items.append(text[start:])
    if any(not item.strip() for item in items):
        raise ValueError(f"slurm hostlist {whole!r}: empty host name")
    return [item.strip() for item in items]


def _expand_host(item: str, whole: str) -> list[str]:
    """`prefix[ranges]rest` → names; `rest` may hold further brackets."""
    open_at = item.find("[")
    if open_at < 0:
        if "]" in item:
            raise ValueError(f"slurm hostlist {whole!r}: ']' without '['")
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_host(rest, whole) if rest else [""]
    return [prefix + number + tail for number in _expand_ranges(body, whole) for tail in tails]


def _expand_ranges(body: str, whole: str) -> list[str]:
    """`01-03,07` → ['01', '02', '03', '07']."""
    numbers = []
    for part in body.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(
                f"slurm hostlist {whole!r}: cannot read the range {part!r} in [{body}]"
            )
        if not dash:
            numbers.append(low)
            continue
        first, last = int(low), int(high)
        if last < first:
            raise ValueError(f"slurm hostlist {whole!r}: range {part!r} runs backwards")
        numbers.extend(str(n).zfill(len(low)) for n in range(first, last + 1))
    return numbers


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
