"""Worker functions of the checkpoint tests (run on every rank of a spawned gloo world)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tests.distributed.workers import (
    StopAfter,
    _StoppingLoader,
    build_trainer,
    local_params,
    split_global_batch,
    tiny_config,
)


def _config(layout: dict, extra=()):
    return tiny_config(layout, micro_batch=layout.get("micro_batch", 2), extra=tuple(extra))


def _load_weights(trainer, weights: dict) -> None:
    from megatron_keye.models.keye_vl.builder import load_full_state

    load_full_state(trainer.model, weights)
    trainer.optimizer.reload_model_params()


def run_worker(*, layout: dict, weights: dict | None, batches: list[dict], train_iters: int,
               save_dir: str | None = None, save_interval: int = 0, stop_after: int | None = None,
               extra: tuple[str, ...] = ()):
    """`Trainer.run()` (auto-resuming from `save_dir`); per-step losses and learning rates."""
    from megatron.core import parallel_state

    from megatron_keye.runtime.trainer import Trainer

    overrides = [f"schedule.train_iters={train_iters}", f"checkpoint.save_interval={save_interval}",
                 "logging.log_interval=1000", *extra]
    if save_dir:
        overrides += [f"checkpoint.save_dir={save_dir}", f"logging.output_dir={save_dir}/logs"]
    else:
        overrides.append("checkpoint.save_at_end=false")
    config = _config(layout, overrides)
    loader = _StoppingLoader(batches, config.schedule.micro_batch_size, stop_after)
    trainer = Trainer(config, loader=loader).setup()
    loader.bind(parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size())
    start = trainer.iteration
    if weights is not None and start == 0:
        _load_weights(trainer, weights)
    history = []
    with contextlib.suppress(StopAfter):
        history = trainer.run()
    listing = sorted(os.listdir(save_dir)) if save_dir else []
    return {"start": start, "losses": [r.loss for r in history], "lrs": [r.lr for r in history],
            "iteration": trainer.iteration, "listing": listing}


def roundtrip_worker(*, layout: dict, weights: dict | None, batches: list[dict],
                     save_dir: str | None = None, load: str | None = None,
                     extra: tuple[str, ...] = ()):
    """Save mode: step on batch 0 and save at iteration 1. Load mode: load `load`.

    Then both evaluate batch 1, step on batch 2 and evaluate batch 3, so a loaded run can be
    compared with the run that saved (the step uses the loaded Adam moments).
    """
    overrides = list(extra)
    if load:
        overrides.append(f"checkpoint.load={load}")
    if save_dir:
        overrides.append(f"checkpoint.save_dir={save_dir}")
    trainer = build_trainer(_config(layout, overrides), batches, None)
    if load is None:
        _load_weights(trainer, weights)
        trainer.train_step(trainer.loader.next_step())
        trainer.iteration = 1
        trainer.save()
    loader = trainer.loader

    def micro(i):
        return split_global_batch(batches[i], loader.dp_rank, loader.dp_size, loader.micro_batch)

    before, _ = trainer.evaluate(micro(1))
    step = trainer.train_step(micro(2))
    after, _ = trainer.evaluate(micro(3))
    return {"eval_before": before, "step_loss": step.loss, "eval_after": after,
            "iteration": trainer.iteration}


def refused_load_worker(*, layout: dict, load: str, extra: tuple[str, ...] = ()):
    """The error a load into this layout raises (None when it loads)."""
    try:
        build_trainer(_config(layout, [f"checkpoint.load={load}", *extra]), [], None)
    except ValueError as error:
        return str(error)
    return None


class Crash(RuntimeError):
    """A simulated process death at one point of a save."""


def _crashing_replace(point: str, name: str):
    """os.replace that dies at `point` of committing checkpoint `name`."""
    real = os.replace

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        publish = src.name == f".tmp_{name}" and dst.name == name
        if point == "before_rename" and publish:
            raise Crash(point)
        if point == "pointer" and dst.name == "latest":
            raise Crash(point)
        real(src, dst)
        if point == "after_rename" and publish:
            raise Crash(point)
        if point == "set_aside" and dst.name == f".old_{name}":
            raise Crash(point)

    return replace


def crash_worker(*, point: str, weights: dict, batches: list[dict], save_dir: str):
    """Save at iteration 2, die at `point` of a later save, resume from `latest`, go on.

    `point`: "writing" (shards written, no metadata), "before_rename" (complete in .tmp_),
    "after_rename" (renamed, `latest` not moved yet), "pointer" (new pointer written aside,
    not renamed), "set_aside" (re-saving iteration 2: the old copy moved aside, the new one not
    in place). Every rank-0 crash is simulated in a one-process world.
    """
    from megatron.core import dist_checkpointing

    from megatron_keye.runtime import checkpoint as ckpt_module

    config = _config({}, [f"checkpoint.save_dir={save_dir}"])
    trainer = build_trainer(config, batches, weights)
    losses = []
    for _ in range(2):
        losses.append(trainer.train_step(trainer.loader.next_step()).loss)
        trainer.iteration += 1
    trainer.save()
    eval_at_2, _ = trainer.evaluate(split_global_batch(batches[3], 0, 1, 2))
    if point != "set_aside":
        losses.append(trainer.train_step(trainer.loader.next_step()).loss)
        trainer.iteration += 1
    crashing = f"iter_{trainer.iteration:07d}"
    real_save, real_replace = dist_checkpointing.save, os.replace

    def dying_save(state, directory, **kwargs):
        real_save(state, directory, **kwargs)
        os.remove(os.path.join(directory, "metadata.json"))
        raise Crash(point)

    if point == "writing":
        ckpt_module.dist_checkpointing.save = dying_save
    else:
        os.replace = _crashing_replace(point, crashing)
    try:
        trainer.save()
        crashed = False
    except Crash:
        crashed = True
    finally:
        ckpt_module.dist_checkpointing.save = real_save
        os.replace = real_replace
    listing = sorted(os.listdir(save_dir))
    latest = Path(save_dir, "latest").read_text().strip()
    resolved = ckpt_module.resolve_checkpoint_dir(save_dir).name
    # A new run with the same save_dir auto-resumes from `latest` and trains on.
    fresh = build_trainer(_config({}, [f"checkpoint.save_dir={save_dir}"]), batches, None)
    resumed_iteration = fresh.iteration
    resumed_eval, _ = fresh.evaluate(split_global_batch(batches[3], 0, 1, 2))
    resumed_loss = fresh.train_step(fresh.loader.next_step()).loss
    fresh.iteration += 1
    fresh.save()
    return {"crashed": crashed, "crashing": crashing, "listing": listing, "latest": latest,
            "resolved": resolved, "resumed_iteration": resumed_iteration,
            "eval_at_2": eval_at_2, "resumed_eval": resumed_eval, "losses": losses,
            "resumed_loss": resumed_loss, "listing_after": sorted(os.listdir(save_dir)),
            "latest_after": Path(save_dir, "latest").read_text().strip()}


def weights_only_worker(*, weights: dict | None, batches: list[dict], save_dir: str | None = None,
                        load: str | None = None):
    """Save mode: 3 steps under a warmup+cosine schedule, then save. Load mode: weights only.

    Both return the parameters, the training position and one further step from batch 0.
    """
    from megatron_keye.runtime.mcore_fallback import optimizer_parts

    extra = ["schedule.warmup_iters=2", "schedule.decay_style=cosine", "schedule.train_iters=6"]
    if load:
        extra += [f"checkpoint.load={load}", "checkpoint.load_weights_only=true"]
    trainer = build_trainer(_config({}, extra), batches, weights)
    if save_dir:
        for _ in range(3):
            trainer.train_step(trainer.loader.next_step())
            trainer.iteration += 1
        trainer.config.checkpoint.save_dir = save_dir
        trainer.save()
    params = local_params(trainer)
    moments = [s[k].abs().sum().item() for part in optimizer_parts(trainer.optimizer)
               for s in part.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s]
    position = {"iteration": trainer.iteration, "scheduler_steps": trainer.scheduler.num_steps,
                "loader_step": trainer.loader.step, "moments": sum(moments),
                "lr_next": trainer.optimizer.param_groups[0]["lr"]}  # the next step's rate
    step = trainer.train_step(split_global_batch(batches[0], 0, 1, 2))
    return {"params": params, **position, "step_loss": step.loss,
            "params_after": local_params(trainer)}


def precision_worker(*, precision: str, weights: dict, batches: list[dict], steps: int):
    """Losses of `steps` training steps in the given precision, and the parameter dtype."""
    trainer = build_trainer(_config({}, [f"precision={precision}"]), batches, weights)
    losses = [trainer.train_step(trainer.loader.next_step()).loss for _ in range(steps)]
    dtypes = {str(p.dtype) for m in trainer.model for p in m.parameters()}
    return {"losses": losses, "dtypes": dtypes}
