"""Workers of test_reference_pass: precompute reference log-probs into shard sidecars, then DPO/MPO
steps with `reference: precomputed` against `reference: model` on the same checkpoint."""

from __future__ import annotations

import torch

from tests.distributed.workers import tiny_config


def shard_config(layout: dict, *, index: str, seq: int, workdir: str, seed: int,
                 extra: tuple[str, ...] = ()):
    """The tiny flavor in `layout` reading the pair shards at `index`."""
    return tiny_config(layout, global_batch=4, micro_batch=2, seq=seq, extra=(
        "data.kind=shards", f"data.sources=[{{path: {index}, weight: 1}}]", "data.num_workers=0",
        "data.shuffle_buffer=4", f"seed={seed}", f"logging.output_dir={workdir}/logs",
        "logging.log_interval=1000", "checkpoint.save_at_end=false", *extra))


def one_step(config) -> dict:
    """Global loss and reports of the first global batch (no optimizer step)."""
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(config).setup()
    batches = trainer.loader.next_step()
    reports = trainer.forward_backward(batches, force_all_reduce=True)
    totals = trainer.step_runner.global_reports(reports)
    total, count = totals.pop("__loss__")
    rows = torch.cat([b["ref_logprobs"] for b in batches]) if "ref_logprobs" in batches[0] \
        else None
    return {"loss": total / count, "reports": {k: s / c for k, (s, c) in totals.items() if c},
            "ref_rows": rows, "labels": torch.cat([b["labels"] for b in batches])}


def save_weights(config, directory: str) -> None:
    """This config's freshly initialized model as a native checkpoint in `directory`."""
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(config).setup()
    trainer.checkpointer.config.save_dir = directory
    trainer.checkpointer.save(chunks=trainer.model, optimizer=None,
                              state=trainer.training_state())


def precomputed_worker(*, index: str, workdir: str, seq: int, layout: dict) -> dict:
    """Reference checkpoint (seed 7) and policy checkpoint (seed 3); the pass writes sidecars;
    MPO with precomputed vs frozen-model reference; DPO with policy = reference."""
    from megatron_keye.post_training.reference_pass import compute_reference_logprobs

    def config(seed: int, *extra: str):
        return shard_config(layout, index=index, seq=seq, workdir=workdir, seed=seed, extra=extra)

    save_weights(config(7), f"{workdir}/ref")
    save_weights(config(3), f"{workdir}/policy")
    summary = compute_reference_logprobs(config(7), f"{workdir}/ref", tag="t1")
    load_policy = (f"checkpoint.load={workdir}/policy", "checkpoint.load_state=weights")
    load_ref = (f"checkpoint.load={workdir}/ref", "checkpoint.load_state=weights")
    out = {"files": summary.files, "samples": summary.samples}
    for head in ("mpo", "dpo"):
        out[(head, "model")] = one_step(config(
            3, *load_policy, f"stage.loss_head={head}", "stage.head.preference.reference=model",
            f"stage.head.preference.reference_load={workdir}/ref"))
        out[(head, "precomputed")] = one_step(config(
            3, *load_policy, f"stage.loss_head={head}",
            "stage.head.preference.reference=precomputed", "data.ref_logprobs=t1"))
    out["dpo_same"] = one_step(config(
        3, *load_ref, "stage.loss_head=dpo", "stage.head.preference.reference=precomputed",
        "data.ref_logprobs=t1"))
    return out
