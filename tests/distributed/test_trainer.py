"""Trainer behaviour: non-finite steps are skipped and counted, freezing, LR schedules."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_keye.testing.distributed import run_workers
from tests.distributed.conftest import random_global_batch
from tests.distributed.workers import build_trainer, local_params, tiny_config


class NaNOnSteps:
    """The LM head, but the loss of the listed (1-based) iterations is NaN."""

    name = "lm"

    def __init__(self, steps):
        from megatron_keye.heads import build_loss_head

        self.steps, self.inner, self.trainer = set(steps), build_loss_head("lm"), None

    def __call__(self, output, batch):
        total, count, report = self.inner(output, batch)
        if self.trainer.iteration + 1 in self.steps:
            total = total * float("nan")
        return total, count, report


def nonfinite_worker(*, weights, batches):
    from megatron_keye.runtime.trainer import NonFiniteLossError, Trainer

    config = tiny_config({}, extra=("schedule.train_iters=8", "stage.max_consecutive_nonfinite=3",
                                    "schedule.warmup_iters=2", "schedule.decay_style=cosine",
                                    "checkpoint.save_at_end=false"))
    head = NaNOnSteps({2, 4, 5, 6})
    from tests.distributed.workers import _DeferredLoader

    trainer = Trainer(config, loss_head=head, loader=_DeferredLoader(batches, 2))
    head.trainer = trainer
    trainer.setup()
    from megatron_keye.models.keye_vl.builder import load_full_state

    load_full_state(trainer.model, weights)
    trainer.optimizer.reload_model_params()
    snapshots, lrs, results = [local_params(trainer)], [], []
    original = trainer.train_step

    def step(mb):
        rate_in_use = trainer.optimizer.param_groups[0]["lr"]
        result = original(mb)
        assert result.lr == rate_in_use, (result.lr, rate_in_use)  # logged = rate applied
        snapshots.append(local_params(trainer))
        lrs.append(trainer.scheduler.num_steps)
        results.append((result.loss, result.applied))
        return result

    trainer.train_step = step
    try:
        trainer.run()
        error = None
    except NonFiniteLossError as err:
        error = str(err)
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:])]
    return {"error": error, "changed": changed, "scheduler_steps": lrs, "results": results,
            "skipped": trainer.skipped_steps, "iteration": trainer.iteration}


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(reference_setup):
    batches = [random_global_batch(reference_setup["config"], rows=8, seed=i) for i in range(4)]
    (r,) = run_workers(nonfinite_worker, 1, weights=reference_setup["weights"], batches=batches)
    # iterations 1..6 ran; 2 skipped; 4, 5, 6 skipped and the third in a row stops the run
    assert [applied for _, applied in r["results"]] == [True, False, True, False, False, False]
    assert r["changed"] == [True, False, True, False, False, False]
    assert r["scheduler_steps"] == [1, 1, 2, 2, 2, 2]
    assert math.isnan(r["results"][1][0]) and math.isfinite(r["results"][2][0])
    assert r["skipped"] == 4 and r["iteration"] == 6
    assert "3 consecutive non-finite" in r["error"]
    assert "stage.max_consecutive_nonfinite" in r["error"]


def freeze_worker(*, weights, batches, patterns):
    config = tiny_config({}, extra=(f"stage.freeze={patterns}",))
    trainer = build_trainer(config, batches, weights)
    before = local_params(trainer)
    trainer.train_step(trainer.loader.next_step())
    after = local_params(trainer)
    trainable = {n for m in trainer.model for n, p in m.module.named_parameters() if p.requires_grad}
    return {"changed": {k for k in before if not torch.equal(before[k], after[k])},
            "all": set(before), "trainable_local": trainable}


def test_frozen_parameters_do_not_move(reference_setup):
    batches = [random_global_batch(reference_setup["config"], rows=8, seed=9)]
    patterns = "[embedding.*,decoder.layers.0.*]"
    (r,) = run_workers(freeze_worker, 1, weights=reference_setup["weights"], batches=batches,
                       patterns=patterns)
    frozen = {k for k in r["all"] if k.startswith(("embedding.", "decoder.layers.0."))}
    assert frozen and r["changed"] == r["all"] - frozen


def schedule_worker(*, style: str):
    from megatron_keye.config import load_config
    from megatron_keye.runtime.trainer import Trainer

    extra = ["schedule.wsd_decay_iters=4"] if style == "wsd" else []
    config = load_config(None, ["schedule.train_iters=12", "schedule.warmup_iters=4",
                                f"schedule.decay_style={style}", "optimizer.lr=1.0",
                                "optimizer.min_lr=0.1", "logging.wandb_mode=disabled",
                                "schedule.global_batch_size=1", *extra])
    trainer = Trainer(config, loader=object()).setup()
    lrs = []
    for _ in range(12):
        trainer.scheduler.step(increment=1)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    decay = {g["weight_decay"] for g in trainer.optimizer.param_groups}
    return {"lrs": lrs, "weight_decays": decay}


@pytest.mark.parametrize("style", ["cosine", "wsd"])
def test_lr_schedules(style):
    (r,) = run_workers(schedule_worker, 1, style=style)
    lrs = r["lrs"]
    assert lrs[:4] == pytest.approx([0.4, 0.6, 0.8, 1.0])  # linear warmup from lr/(4+1)
    assert lrs[-1] == pytest.approx(0.1)  # ends at min_lr
    if style == "wsd":
        assert lrs[4:8] == pytest.approx([1.0] * 4)  # stable phase
        assert all(a > b for a, b in zip(lrs[7:], lrs[8:]))  # then decays over the last 4
    else:
        assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    # norms and biases are never decayed: one group with decay 0.1, one with 0
    assert r["weight_decays"] == {0.1, 0.0}
