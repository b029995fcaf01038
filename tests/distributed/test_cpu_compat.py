"""Each CPU shim does its one job, and nothing more (run in a fresh one-rank world)."""

from __future__ import annotations

from megatron_keye.testing.distributed import run_workers
from tests.distributed.workers_runtime import cuda_scoping_worker


def shim_worker():
    import os

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import param_and_grad_buffer

    from megatron_keye.runtime import cpu_compat
    from megatron_keye.runtime.parallel import ParallelDims

    os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)  # may be inherited from the test process
    ParallelDims().initialize(seed=3)
    out = {"applied": cpu_compat.is_applied()}
    out["max_connections"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    out["current_device"] = str(torch.cuda.current_device())
    out["cuda_factory"] = str(torch.zeros(2, device="cuda").device)
    out["to_cuda"] = str(torch.ones(1).to("cuda").device)
    out["cuda_method"] = str(torch.ones(1).cuda().device)
    # The CUDA type names only appear inside megatron's optimizer constructors.
    out["type_outside"] = torch.ones(1).type()
    # The TP RNG tracker forks a separate stream and restores the default one.
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    torch.manual_seed(0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(3)
    out["default_restored"] = torch.equal(torch.rand(3), expected_default)
    out["forked_differs"] = not torch.equal(forked, expected_default)
    # One-rank buffer collectives stay local: right result, and no gloo collective is issued
    # (gloo's would be right too, at the cost of cloning the buffer: the group's sequence
    # number counts the collectives it ran).
    group = parallel_state.get_data_parallel_group()
    issued_before = group._get_sequence_number_for_group()
    src, dst = torch.arange(6.0), torch.zeros(6)
    handle = param_and_grad_buffer.dist_reduce_scatter_func(dst, src, group=group)
    copied = handle is None and torch.equal(dst, src)
    buffer = torch.arange(6.0)  # megatron's in-place form: the output is a view of the input
    param_and_grad_buffer.dist_reduce_scatter_func(buffer[0:6], buffer, group=group)
    gathered = torch.zeros(6)
    handle = param_and_grad_buffer.dist_all_gather_func(gathered, torch.arange(6.0), group=group)
    copied = copied and handle is None and torch.equal(gathered, torch.arange(6.0))
    out["reduce_scatter_local"] = copied and torch.equal(buffer, torch.arange(6.0))
    out["collectives_issued"] = group._get_sequence_number_for_group() - issued_before
    # Sanity check of the probe: an ordinary collective on the same group is counted.
    dist.all_reduce(torch.ones(1), group=group)
    out["probe_counts"] = group._get_sequence_number_for_group() - issued_before
    out["world"] = dist.get_world_size()
    return out


def test_cpu_shims():
    (r,) = run_workers(shim_worker, 1)
    assert r["applied"] and r["world"] == 1
    assert r["current_device"] == "cpu"
    assert r["cuda_factory"] == r["to_cuda"] == r["cuda_method"] == "cpu"
    assert r["type_outside"] == "torch.FloatTensor"
    assert r["default_restored"] and r["forked_differs"]
    assert r["reduce_scatter_local"]
    assert r["collectives_issued"] == 0 and r["probe_counts"] == 1
    assert r["max_connections"] == "1"  # silences megatron's per-backward CUDA stream advice


def test_nothing_is_shimmed_on_a_cuda_run():
    """With CUDA present `apply()` installs nothing: no patched attribute, mode or variable."""
    (r,) = run_workers(cuda_scoping_worker, 1)
    assert r["active"] is False and r["is_applied"] is False
    assert r["changed"] == []
    assert r["new_modes"] == []
    assert r["max_connections"] is None
