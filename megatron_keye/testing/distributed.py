"""Run a function in N fresh gloo processes and collect what each returns.

Used by the parity tests and the benchmarks: every rank is a spawned interpreter (clean
megatron-core globals), on a free loopback port, with one thread, and the whole world is
killed if any rank fails or the timeout passes, so a broken collective never hangs a test run.
Results travel as `torch.save` bytes, so tensors arrive intact after the child exits.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import traceback
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from megatron_keye.runtime.parallel import free_port


def run_workers(
    fn: Callable[..., object],
    world_size: int,
    *,
    timeout: float = 300.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
    **kwargs,
) -> list[object]:
    """`fn(**kwargs)` on every rank of a new world; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, rank, world_size, port, threads, env or {}, kwargs, results),
            daemon=False,  # dist_checkpointing starts a Manager process from each rank
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    failures = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode]
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} ranks: no result within {timeout:.0f}s "
                    f"(ranks that died: {dead}; collected: {sorted(outputs)})"
                ) from None
            if ok:
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break
    finally:
        if failures or len(outputs) < world_size:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=30)
    if failures:
        raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(failures))
    return [outputs[r] for r in range(world_size)]


def _entry(fn, rank, world_size, port, threads, env, kwargs, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads), **env,
    )
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        value = fn(**kwargs)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megatron_keye.runtime.parallel import shutdown

        with contextlib.suppress(Exception):
            shutdown()
