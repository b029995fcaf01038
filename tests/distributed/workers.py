"""Worker functions run on every rank of a spawned gloo world by the distributed tests."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_keye.config import load_config


def tiny_config(layout: dict, *, global_batch: int = 8, micro_batch: int = 2, seq: int = 32,
                extra: tuple[str, ...] = ()):
    """The tiny flavor in a given layout, fp32, constant LR, no warmup."""
    overrides = [
        f"parallel.tensor={layout.get('tensor', 1)}",
        f"parallel.pipeline={layout.get('pipeline', 1)}",
        f"parallel.virtual_pipeline={layout.get('vpp', 1)}",
        f"parallel.context={layout.get('context', 1)}",
        f"parallel.cp_comm={layout.get('cp_comm', 'p2p')}",
        f"parallel.cp_a2a_size={layout.get('cp_a2a_size', 1)}",
        f"model.recompute={layout.get('recompute', 'none')}",
        f"parallel.sequence_parallel={str(layout.get('sp', False)).lower()}",
        f"parallel.distributed_optimizer={str(layout.get('zero1', True)).lower()}",
        f"schedule.global_batch_size={global_batch}",
        f"schedule.micro_batch_size={micro_batch}",
        "schedule.warmup_iters=0",
        "schedule.decay_style=constant",
        "schedule.train_iters=10",
        f"data.seq_length={seq}",
        "optimizer.lr=0.01",
        "optimizer.min_lr=0.0",
        "logging.wandb_mode=disabled",
        *extra,
    ]
    return load_config(None, overrides)


class StaticLoader:
    """Hands out prepared global batches in order; its state is the step count."""

    def __init__(self, global_batches: list[dict], *, dp_rank: int, dp_size: int, micro_batch: int):
        self.global_batches = global_batches
        self.dp_rank, self.dp_size, self.micro_batch = dp_rank, dp_size, micro_batch
        self.step = 0

    def next_step(self) -> list[dict]:
        batch = self.global_batches[self.step % len(self.global_batches)]
        self.step += 1
        return split_global_batch(batch, self.dp_rank, self.dp_size, self.micro_batch)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def split_global_batch(batch: dict, dp_rank: int, dp_size: int, micro_batch: int) -> list[dict]:
    """This data-parallel rank's micro-batches: rank r takes a contiguous 1/dp of the rows."""
    rows = batch["tokens"].size(0)
    per_rank = rows // dp_size
    out = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch):
        mb = {}
        for key, value in batch.items():
            mb[key] = value[:, start : start + micro_batch] if key == "position_ids" \
                else value[start : start + micro_batch]
        out.append(mb)
    return out


def build_trainer(config, global_batches: list[dict], weights: dict | None):
    """A set-up Trainer fed by `global_batches`, optionally with full native weights loaded."""
    from megatron.core import parallel_state

    from megatron_keye.models.keye_vl.builder import load_full_state
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(config, loader=_DeferredLoader(global_batches, config.schedule.micro_batch_size))
    trainer.setup()
    trainer.loader.bind(parallel_state.get_data_parallel_rank(),
                        parallel_state.get_data_parallel_world_size())
    if weights is not None:
        load_full_state(trainer.model, weights)
        trainer.optimizer.reload_model_params()
    return trainer


class _DeferredLoader(StaticLoader):
    """A StaticLoader whose data-parallel rank is known only after process groups exist."""

    def __init__(self, global_batches, micro_batch):
        super().__init__(global_batches, dp_rank=0, dp_size=1, micro_batch=micro_batch)

    def bind(self, dp_rank: int, dp_size: int) -> None:
        self.dp_rank, self.dp_size = dp_rank, dp_size


def local_grads(trainer) -> dict[str, torch.Tensor]:
    """Finalized gradients of this rank, keyed by global parameter name."""
    from megatron_keye.models.keye_vl.builder import named_parameters_global

    out = {}
    for chunk in trainer.model:
        for name, param in named_parameters_global(chunk).items():
            out[name] = param.main_grad.detach().clone()
    return out


def local_params(trainer) -> dict[str, torch.Tensor]:
    from megatron_keye.models.keye_vl.builder import named_parameters_global

    out = {}
    for chunk in trainer.model:
        for name, param in named_parameters_global(chunk).items():
            out[name] = param.detach().clone()
    return out


def rank_info() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
    }


def grad_parity_worker(*, layout: dict, weights: dict, batch: dict, zero1_step: bool = False):
    """Loss and finalized gradients of one global batch (and, optionally, one ZeRO-1 step)."""
    config = tiny_config(layout, micro_batch=layout.get("micro_batch", 2))
    trainer = build_trainer(config, [batch], weights)
    microbatches = trainer.loader.next_step()
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    # force_all_reduce: under ZeRO-1 every rank then holds the full gradient to compare.
    reports = trainer.forward_backward(microbatches, force_all_reduce=True)
    total, count = trainer.step_runner.global_reports(reports)["__loss__"]
    result = {**rank_info(), "loss": total / count, "count": count, "grads": local_grads(trainer)}
    if zero1_step:
        # The real path: reduce-scatter, sharded AdamW step, parameter all-gather.
        step = trainer.train_step(trainer.loader.next_step())
        result["step_loss"] = step.loss
        result["grad_norm"] = step.grad_norm
        result["step_tokens"], result["step_loss_tokens"] = step.tokens, step.loss_tokens
        result["params_after"] = local_params(trainer)
        from megatron_keye.runtime.optim import optimizer_state_bytes

        result["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizer)
    return result


def logits_worker(*, layout: dict, weights: dict, tokens: torch.Tensor):
    """Full-vocabulary logits of `tokens` through the pipeline (returned by the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_keye.models.keye_vl.rope import text_position_ids

    b, s = tokens.shape
    config = tiny_config(layout, global_batch=b, micro_batch=b, seq=s)
    trainer = build_trainer(config, [], weights)
    batch = {"tokens": tokens, "position_ids": text_position_ids(b, s)}
    collected = []

    def forward_step(data_iterator, model):
        item = next(data_iterator)
        out = model(item["tokens"], item["position_ids"])

        def keep(output, non_loss_data=False):
            collected.append(output.detach())
            return output.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return out, keep

    for chunk in trainer.model:
        chunk.eval()
    vpp = len(trainer.model)
    iters = [iter([batch]) for _ in range(vpp)]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if vpp > 1 else iters[0],
            model=trainer.model, num_microbatches=1, seq_length=s, micro_batch_size=b,
            forward_only=True,
        )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = collected[0]  # [s, b, vocab/tp]
    pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1).transpose(0, 1).contiguous()


class StopAfter(Exception):
    """Raised by a loader to stop a run abruptly after a given number of steps."""


class _StoppingLoader(_DeferredLoader):
    def __init__(self, global_batches, micro_batch, stop_after):
        super().__init__(global_batches, micro_batch)
        self.stop_after = stop_after

    def next_step(self):
        if self.stop_after is not None and self.step >= self.stop_after:
            raise StopAfter(self.step)
        return super().next_step()


def train_run_worker(*, layout: dict, weights: dict | None, batches: list[dict], train_iters: int,
                     save_dir: str | None = None, save_interval: int = 0, load: str | None = None,
                     stop_after: int | None = None, extra: tuple[str, ...] = ()):
    """Train with `Trainer.run()`; returns the per-step losses (stops early at `stop_after`)."""
    from megatron.core import parallel_state

    from megatron_keye.models.keye_vl.builder import load_full_state
    from megatron_keye.runtime.trainer import Trainer

    overrides = [f"schedule.train_iters={train_iters}",
                 f"checkpoint.save_interval={save_interval}",
                 "logging.log_interval=1000", *extra]
    if save_dir:
        overrides.append(f"checkpoint.save_dir={save_dir}")
        overrides.append(f"logging.output_dir={save_dir}/logs")
    else:
        overrides.append("checkpoint.save_at_end=false")
    if load:
        overrides.append(f"checkpoint.load={load}")
    config = tiny_config(layout, micro_batch=layout.get("micro_batch", 2), extra=tuple(overrides))
    loader = _StoppingLoader(batches, config.schedule.micro_batch_size, stop_after)
    trainer = Trainer(config, loader=loader)
    trainer.setup()
    loader.bind(parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    start = trainer.iteration
    if weights is not None and start == 0:
        load_full_state(trainer.model, weights)
        trainer.optimizer.reload_model_params()
    losses = []
    original_step = trainer.train_step

    def recording_step(microbatches):
        result = original_step(microbatches)
        losses.append(result.loss)
        return result

    trainer.train_step = recording_step
    with contextlib.suppress(StopAfter):
        trainer.run()
    return {"start": start, "losses": losses, "iteration": trainer.iteration}
