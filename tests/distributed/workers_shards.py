"""Worker functions of the shard-training test (run on every rank of a spawned gloo world)."""

from __future__ import annotations


def train_from_shards_worker(*, overrides: list[str]):
    """`Trainer.run()` on `data.kind: shards`; per-step losses and the loader's metrics."""
    import torch.distributed as dist

    from megatron_keye.config.loading import load_config
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(load_config(None, overrides)).setup()
    start = trainer.iteration
    history = trainer.run()
    metrics = trainer.loader.metrics()
    return {"rank": dist.get_rank(), "start": start, "losses": [r.loss for r in history],
            "metrics": metrics}
