"""Run a function on every rank of a freshly spawned local world and collect what each returns.

Used where one command needs several processes without a launcher (`convert import` at TP×PP)
and, through `megatron_keye.testing.distributed`, by the parity tests. Each rank is a spawned
interpreter (clean megatron-core globals) with RANK/WORLD_SIZE/MASTER_* set for a free loopback
port; the function itself initializes torch.distributed (gloo on CPU, nccl on GPUs, via
`ParallelDims`). Results travel back as `torch.save` bytes, so tensors survive the child's exit.

If any rank raises, or no result arrives within the timeout, every rank is killed and the parent
raises one exception: `RankError` naming the first failing rank and its error in one line (the
rank's traceback is kept on the exception), or `TimeoutError`.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import time
import traceback
from collections.abc import Callable

# torch is imported inside the functions: the CLI imports `RankError` for every command.

_POLL_S = 0.5  # how often the parent looks for ranks that died without reporting
_REPORT_GRACE_S = 5.0


class RankError(RuntimeError):
    """A spawned rank raised; `str()` is one line, `remote_traceback` holds the rank's traceback."""

    def __init__(self, *, function: str, rank: int, world_size: int, error_type: str,
                 message: str, remote_traceback: str):
        self.function, self.rank, self.world_size = function, rank, world_size
        self.error_type, self.message = error_type, message
        self.remote_traceback = remote_traceback
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        super().__init__(
            f"{function} failed on rank {rank} of {world_size}: {error_type}: {first_line}"
        )


def spawn_ranks(
    fn: Callable[..., object],
    world_size: int,
    *,
    timeout: float = 300.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
    quiet_warnings: bool = True,
    **kwargs,
) -> list[object]:
    """`fn(**kwargs)` on every rank of a new local world; the results in rank order.

    `fn` must be importable (a module-level function); `threads` sets each rank's torch and
    OpenMP threads; `env` adds environment variables in every rank.
    """
    import torch
    import torch.multiprocessing as mp

    from megatron_keye.runtime.parallel import free_port

    ctx = _rank_context(mp)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, threads, env or {}, quiet_warnings, kwargs, results),
            daemon=False,  # dist_checkpointing starts a Manager process from each rank
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    failure: RankError | None = None
    deadline = time.monotonic() + timeout
    died_at: float | None = None
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                now = time.monotonic()
                dead = [i for i, p in enumerate(procs)
                        if i not in outputs and not p.is_alive() and p.exitcode]
                if dead:
                    # A rank that raised reports before it exits; give its report a moment.
                    died_at = died_at or now
                    if now - died_at > _REPORT_GRACE_S:
                        failure = RankError(
                            function=fn.__name__, rank=dead[0], world_size=world_size,
                            error_type="died",
                            message=f"exit code {procs[dead[0]].exitcode} without a report",
                            remote_traceback="")
                        break
                if now > deadline:
                    raise TimeoutError(
                        f"{fn.__name__} on {world_size} ranks: no result within {timeout:.0f}s "
                        f"(ranks that died: {dead}; finished: {sorted(outputs)})"
                    ) from None
                continue
            if not ok:
                error_type, message, remote = payload
                failure = RankError(function=fn.__name__, rank=rank, world_size=world_size,
                                    error_type=error_type, message=message,
                                    remote_traceback=remote)
                break
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        if len(outputs) < world_size:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=30)
    if failure is not None:
        raise failure
    return [outputs[r] for r in range(world_size)]


# Imported once by the fork server, so each rank starts as a fork of an interpreter that already
# holds torch and megatron-core (seconds per rank otherwise) but has run nothing: no threads, no
# OpenMP pool, no megatron-core globals. Modules that fail to import here are imported by the rank.
_PRELOAD = ("torch", "torch.distributed", "megatron.core", "megatron_keye.runtime.trainer")


def _rank_context(mp):
    """A fork-server context preloading `_PRELOAD` (spawn where fork servers do not exist)."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


def _rank_main(fn, rank, world_size, port, threads, env, quiet_warnings, kwargs, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads), **env,
    )
    import torch

    torch.set_num_threads(threads)
    if quiet_warnings:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        value = fn(**kwargs)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException as err:  # noqa: BLE001 (every failure must reach the parent)
        results.put((rank, False, (type(err).__name__, _message(err), traceback.format_exc())))
    finally:
        from megatron_keye.runtime.parallel import shutdown

        with contextlib.suppress(Exception):
            shutdown()


def _message(err: BaseException) -> str:
    # KeyError's str() is the repr of its key; show the message as written.
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


__all__ = ["RankError", "spawn_ranks"]
