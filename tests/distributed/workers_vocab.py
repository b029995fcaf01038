"""Workers for the padded-vocabulary and tied-embedding tests (run on every rank of a gloo world)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed.workers import build_trainer, split_global_batch, tiny_config


def _full_logits(trainer, batch: dict) -> torch.Tensor | None:
    """[b, s, padded vocab] logits of the batch's tokens (last pipeline stage; None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = batch["tokens"].shape
    collected = []

    def forward_step(data_iterator, model):
        item = next(data_iterator)
        out = model(item["tokens"], item["position_ids"])

        def keep(output, non_loss_data=False):
            collected.append(output.detach())
            return output[..., :1].sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return out, keep

    for chunk in trainer.model:
        chunk.eval()
    vpp = len(trainer.model)
    item = {"tokens": batch["tokens"], "position_ids": batch["position_ids"]}
    iters = [iter([item]) for _ in range(vpp)]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if vpp > 1 else iters[0],
            model=trainer.model, num_microbatches=1, seq_length=s, micro_batch_size=b,
            forward_only=True,
        )
    for chunk in trainer.model:
        chunk.train()
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = collected[0]  # [s, b, padded vocab / tp]
    pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1).transpose(0, 1).contiguous()


def _gathered(trainer=None, *, grads: bool, chunks=None) -> dict[str, torch.Tensor]:
    """This stage's full (tensor-parallel-merged) gradients or weights, by global name."""
    from megatron.core import parallel_state as ps

    from megatron_keye.models.keye_vl.builder import named_parameters_global
    from megatron_keye.models.keye_vl.hf_adapter import merge_tensor_shards

    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in trainer.model if chunks is None else chunks:
        for name, param in named_parameters_global(chunk).items():
            local = (param.main_grad if grads else param).detach().contiguous()
            pieces = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(pieces, local, group=ps.get_tensor_model_parallel_group())
            out[name] = merge_tensor_shards(name, pieces)
    return out


def odd_vocab_worker(*, layout: dict, model_overrides: tuple[str, ...], load: str,
                     also_load: str, batch: dict) -> dict | None:
    """Load `load`, then: logits, LM loss, finalized gradients, one optimizer step; then load
    `also_load` into the same model and take its logits again.

    Returns (from tensor-parallel rank 0 of each stage) this stage's gathered gradients and
    post-step weights; the last stage adds logits and losses.
    """
    from megatron.core import parallel_state as ps

    rows, seq = batch["tokens"].shape
    config = tiny_config(layout, global_batch=rows, micro_batch=rows, seq=seq,
                         extra=(*model_overrides, f"checkpoint.load={load}"))
    trainer = build_trainer(config, [batch], None)
    microbatches = split_global_batch(batch, 0, 1, rows)
    result: dict = {"pp_rank": ps.get_pipeline_model_parallel_rank(),
                    "tp_rank": ps.get_tensor_model_parallel_rank()}
    # A freshly built (randomly initialized) model of this layout, before any loading.
    from megatron_keye.models.keye_vl.builder import build_model_chunks

    fresh = _gathered(grads=False, chunks=build_model_chunks(config))
    result["fresh_vocab_weights"] = {k: v for k, v in fresh.items()
                                     if k in ("embedding.word_embeddings.weight",
                                              "output_layer.weight")}
    result["logits"] = _full_logits(trainer, batch)
    result["loss"], result["count"] = trainer.evaluate(microbatches)
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.forward_backward(microbatches, force_all_reduce=True)
    result["grads"] = _gathered(trainer, grads=True)
    step = trainer.train_step(microbatches)
    result["step_loss"], result["grad_norm"] = step.loss, step.grad_norm
    result["after_step"] = _gathered(trainer, grads=False)
    trainer.checkpointer.load(also_load, chunks=trainer.model, optimizer=None, weights_only=True)
    result["logits_other"] = _full_logits(trainer, batch)
    return result if result["tp_rank"] == 0 else None


def import_evaluate_export_worker(*, hf_dir: str, import_to: str, export_from: str,
                                  export_to: str, **worker_kwargs) -> dict | None:
    """On a one-rank world (saving two process starts): import `hf_dir` at TP=1 into
    `import_to`, run `odd_vocab_worker`, then export `export_from` to `export_to`.

    `convert` runs in this process because it was started as the one rank it needs.
    """
    from megatron_keye.convert import export_hf, import_hf

    import_hf(hf_dir, import_to)
    result = odd_vocab_worker(layout={}, **worker_kwargs)
    export_hf(export_from, export_to)
    return result
