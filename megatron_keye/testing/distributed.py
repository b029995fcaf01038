"""Run a function in N fresh gloo processes and collect what each returns (tests, benchmarks).

A thin layer over the production `megatron_keye.runtime.spawn.spawn_ranks` (spawned ranks on a
free loopback port, one thread each, every rank killed on failure or timeout): a failing rank's
full traceback is put in the raised error's message, which is what a failing test should show.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_keye.runtime.spawn import RankError, spawn_ranks


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
    try:
        return spawn_ranks(fn, world_size, timeout=timeout, threads=threads, env=env, **kwargs)
    except RankError as err:
        raise RuntimeError(f"{err}\n--- rank {err.rank} ---\n{err.remote_traceback}") from err
