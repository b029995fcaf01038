"""Workers of the end-to-end context-parallel tests (run on every rank of a gloo world)."""

from __future__ import annotations

from tests.distributed.workers import build_trainer, tiny_config


def extension_eval_worker(*, layout: dict, load: str, batch: dict, seq: int, rope_base: float):
    """Load a checkpoint's weights into a (longer, other RoPE base, other layout) run; eval."""
    config = tiny_config(layout, seq=seq, extra=(
        f"model.rope_base={rope_base}", f"checkpoint.load={load}",
        "checkpoint.load_weights_only=true",
    ))
    trainer = build_trainer(config, [batch], weights=None)
    loss, count = trainer.evaluate(trainer.loader.next_step())
    return {"loss": loss, "count": count}


def extension_step_worker(*, layout: dict, load: str, batch: dict, seq: int, rope_base: float,
                          weights_only: bool):
    """Load a checkpoint (weights, and Adam state unless `weights_only`) into a longer, other-base,
    other-layout run; the loss before a step, the step's loss and the loss after it."""
    config = tiny_config(layout, seq=seq, extra=(
        f"model.rope_base={rope_base}", f"checkpoint.load={load}",
        f"checkpoint.load_weights_only={str(weights_only).lower()}",
    ))
    trainer = build_trainer(config, [batch, batch, batch], weights=None)
    before, count = trainer.evaluate(trainer.loader.next_step())
    step = trainer.train_step(trainer.loader.next_step())
    after, _ = trainer.evaluate(trainer.loader.next_step())
    return {"before": before, "count": count, "step": step.loss, "after": after,
            "iteration": trainer.iteration}


def attention_calls_worker(*, modes: list[str], batch: dict):
    """How many times core attention runs in one forward+backward of one micro-batch, per
    `model.recompute` mode."""
    from megatron_keye.ops.attention.core import CoreAttention

    counts = {}
    for mode in modes:
        config = tiny_config({"recompute": mode}, global_batch=2, micro_batch=2)
        trainer = build_trainer(config, [batch], weights=None)
        calls = []
        for chunk in trainer.model:
            for module in chunk.modules():
                if isinstance(module, CoreAttention):
                    module.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        trainer.forward_backward(trainer.loader.next_step())
        counts[mode] = len(calls)
    return counts
