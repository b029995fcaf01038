"""The only place CPU workarounds for megatron-core 0.16.1 live.

megatron-core assumes CUDA in a handful of places that are otherwise device-agnostic. Without
CUDA, `apply()` installs one narrow shim per assumption, each naming the megatron-core site it
covers; with CUDA it installs nothing at all (no patched attribute, no TorchFunctionMode, no
environment variable). The sites are those of megatron-core 0.16.1, which `apply()` checks first
(`mcore_version.require_supported_mcore`). Every shim is exercised by
`tests/distributed/test_cpu_compat.py` and, end to end, by the gloo parity tests. Nothing else in
the package mentions CPU workarounds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from megatron_keye.mcore_version import require_supported_mcore

_APPLIED = False
_LOCK = threading.Lock()
CPU = torch.device("cpu")
_DEVICE_MODE: TorchFunctionMode | None = None  # the entered `_CudaArgumentsToCpu`, if any


def needed() -> bool:
    """True when the shims are required (no CUDA device)."""
    return not torch.cuda.is_available()


def apply() -> bool:
    """Install every shim once (idempotent) when CUDA is absent. Returns True if shims are active.

    With CUDA available it returns False and changes nothing.
    """
    global _APPLIED
    if not needed():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        require_supported_mcore("megatron_keye.runtime.cpu_compat")
        _current_device_is_cpu()
        _rng_tracker_on_cpu_state()
        _cuda_sync_and_seed_noops()
        _cuda_device_arguments_to_cpu()
        _cuda_type_names_for_optimizer_dispatch()
        _one_rank_buffer_collectives_stay_local()
        _fsdp2_mesh_on_cpu()
        _no_cuda_stream_advice()
        _APPLIED = True
    return True


def is_applied() -> bool:
    """Whether `apply()` installed the shims in this process."""
    return _APPLIED


def _no_cuda_stream_advice() -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 (it orders CUDA streams; without CUDA it means nothing).

    Silences tensor_parallel/layers.py:728, which warns on every sequence-parallel linear's
    backward when the variable is unset.
    """
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _current_device_is_cpu() -> None:
    """`torch.cuda.current_device()` → cpu.

    Covers device arguments built from it, e.g. megatron/core/tensor_parallel/layers.py:261/552/873,
    models/common/embeddings/rotary_pos_embedding.py (inv_freq), distributed/param_and_grad_buffer.py.
    """
    torch.cuda.current_device = lambda: CPU


def _rng_tracker_on_cpu_state() -> None:
    """The tensor-parallel RNG tracker forks and restores the CPU generator instead of CUDA's.

    Covers megatron/core/tensor_parallel/random.py:41 (`_get_cuda_rng_state`) and :72
    (`_set_cuda_rng_state`), used by `CudaRNGStatesTracker.add/fork` (random.py:230-277).
    """
    import megatron.core.tensor_parallel.random as mc_random

    mc_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def _cuda_sync_and_seed_noops() -> None:
    """`torch.cuda.{get_rng_state, manual_seed, synchronize}` on the CPU.

    Covers megatron/core/tensor_parallel/random.py:235-238 and :422 (tracker seeding in
    `model_parallel_cuda_manual_seed`) and the `torch.cuda.synchronize()` calls of
    dist_checkpointing (strategies/filesystem_async.py:230, strategies/fully_parallel.py:272/281,
    tensor_aware_state_dict.py:304).
    """
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _as_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return CPU
    return device


class _CudaArgumentsToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"`/integer devices to CPU and drops `pin_memory` in torch calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_as_cpu(kwargs["device"]))
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], str | torch.device):
            args = (args[0], _as_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


def _cuda_device_arguments_to_cpu() -> None:
    """Hard-coded `device="cuda"`, `.cuda()` and `pin_memory=True` resolve to the CPU.

    Covers megatron/core/pipeline_parallel/schedules.py:596/983/2138 (`total_num_tokens`),
    optimizer/clip_grads.py:90/103/115/174/207, optimizer/optimizer.py:473/481/485/907,
    distributed/param_and_grad_buffer.py:768, dist_checkpointing/exchange_utils.py:104/110/326/336/499
    and strategies/state_dict_saver.py:204; `.cuda()` at
    models/common/language_module/language_module.py:244 (a tied embedding's copy on the last
    pipeline stage, all-reduced from the first). A TorchFunctionMode entered for good is the only hook
    that reaches factory calls inside those function bodies; it only rewrites CUDA device
    arguments (none of ours pass one). torch keeps the mode stack per thread, so it covers the
    thread that called `apply()`: every covered site runs on the training thread (the
    dist_checkpointing writers that run elsewhere only write bytes).
    """
    global _DEVICE_MODE
    _DEVICE_MODE = _CudaArgumentsToCpu()
    _DEVICE_MODE.__enter__()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


@contextlib.contextmanager
def device_arguments_as_given() -> Iterator[None]:
    """Run a block without the CUDA-argument rewriting mode (where it is the innermost mode).

    The mode costs a Python call on every torch op. Generation's per-token loop is thousands of
    small ops and reaches none of the covered sites (it builds no optimizer, schedule or
    checkpoint), so it pauses the mode; without the shims this does nothing.
    """
    mode = _DEVICE_MODE
    if mode is None or torch.overrides._get_current_function_mode() is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def _cuda_type_names_for_optimizer_dispatch() -> None:
    """While megatron-core builds optimizer param groups, CPU tensors report CUDA type names.

    megatron/core/optimizer/distrib_optimizer.py:361/420/582 and optimizer/optimizer.py:671/690
    dispatch on `param.type() == "torch.cuda.FloatTensor"` and raise TypeError for CPU tensors;
    optimizer/clip_grads.py:167 asserts it. The rename is scoped to the two constructors and the
    clipping function that reach those lines, not applied globally.
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    targets = [
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        # Bound by name in both modules (optimizer.py imports it from clip_grads).
        (clip_grads, "clip_grad_by_total_norm_fp32"),
        (optimizer, "clip_grad_by_total_norm_fp32"),
    ]
    for owner, name in targets:
        setattr(owner, name, _with_cuda_type_names(getattr(owner, name)))


def _with_cuda_type_names(method):
    original_type = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        previous = torch.Tensor.type
        torch.Tensor.type = cuda_named_type
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.type = previous

    return wrapper


def _one_rank_buffer_collectives_stay_local() -> None:
    """Gradient reduce-scatter and parameter all-gather on a one-rank group become local copies.

    megatron/core/distributed/param_and_grad_buffer.py:443 (gradient reduce-scatter) and :285
    (parameter all-gather) run even when the data-parallel group has a single rank; gloo then
    issues a collective that clones the whole gradient buffer every step (~100 MB for a
    26M-parameter model). The result is right either way: this is a cost shim. On one rank both
    collectives are the identity: copy when output and input differ, else nothing, and no
    collective is issued on the group. Asynchronous calls (overlap_grad_reduce) go to gloo
    unchanged: their handles are awaited.
    """
    from megatron.core.distributed import param_and_grad_buffer as buffers

    for name in ("dist_reduce_scatter_func", "dist_all_gather_func"):
        setattr(buffers, name, _local_when_alone(getattr(buffers, name)))


def _local_when_alone(collective):
    @functools.wraps(collective)
    def call(output, input, *args, group=None, async_op=False, **kwargs):
        if not async_op and group is not None and group.size() == 1:
            if output.data_ptr() != input.data_ptr() or output.shape != input.shape:
                output.copy_(input)
            return None
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    return call


def _fsdp2_mesh_on_cpu() -> None:
    """megatron-core's torch-FSDP2 wrapper builds its device mesh on the CPU.

    megatron/core/distributed/torch_fully_sharded_data_parallel.py:82 calls
    `DeviceMesh.from_group(group, "cuda")`; FSDP2 then places its all-gather and reduce-scatter
    buffers on the mesh's device type. The module-level name is rebound to a subclass whose
    `from_group` maps a CUDA device type to "cpu" (FSDP2 itself runs on CPU with gloo).
    """
    from megatron.core.distributed import torch_fully_sharded_data_parallel as torch_fsdp
    from torch.distributed import DeviceMesh

    class CpuDeviceMesh(DeviceMesh):
        @staticmethod
        def from_group(group, device_type, *args, **kwargs):
            if device_type == "cuda" or str(device_type).startswith("cuda:"):
                device_type = "cpu"
            return DeviceMesh.from_group(group, device_type, *args, **kwargs)

    torch_fsdp.DeviceMesh = CpuDeviceMesh
