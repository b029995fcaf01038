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
