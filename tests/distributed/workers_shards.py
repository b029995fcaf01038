"""Worker functions of the shard-training test (run on every rank of a spawned gloo world)."""

from __future__ import annotations


def _digest(batch) -> list:
    """A fingerprint of a micro-batch: every field's shape and an order-sensitive checksum."""
    import torch

    out = []
    for name in sorted(batch):
        flat = batch[name].double().flatten()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        out.append((name, tuple(batch[name].shape), float((flat * weights).sum())))
    return out


def train_from_shards_worker(*, overrides: list[str]):
    """`Trainer.run()` on `data.kind: shards`; per-step losses, the loader's metrics and a
    fingerprint of every micro-batch this rank trained on."""
    import torch.distributed as dist

    from megatron_keye.config.loading import load_config
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(load_config(None, overrides)).setup()
    seen = []
    next_step = trainer.loader.next_step

    def recording_next_step():
        batches = next_step()
        seen.append([_digest(b) for b in batches])
        return batches

    trainer.loader.next_step = recording_next_step
    start = trainer.iteration
    history = trainer.run()
    metrics = trainer.loader.metrics()
    return {"rank": dist.get_rank(), "start": start, "losses": [r.loss for r in history],
            "metrics": metrics, "batches": seen}
