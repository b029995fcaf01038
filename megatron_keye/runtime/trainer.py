"""The training loop: model step → (skip if non-finite) clip → update → log → save.

`Trainer.setup()` builds everything from a `TrainConfig`; `train_step(microbatches)` runs one
global batch through the model step (`runtime/step.py`: megatron-core's pipeline schedule and the
loss head) and the optimizer; `run()` loops, logs, checkpoints and stops cleanly on SIGTERM or
SIGUSR1 (slurm's warning before the time limit) with a checkpoint. Losses come from a loss head
as (sum, count); gradients are divided once by the global count (megatron's per-token mode), so
micro-batching, data parallelism and pipelining never change the math.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from megatron_keye.config import config_to_dict, num_microbatches, validate
from megatron_keye.config.schema import TrainConfig
from megatron_keye.heads import LossHead, build_loss_head
from megatron_keye.models.keye_vl.builder import build_model_chunks
from megatron_keye.ops.collectives import all_reduce_values
from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState, resolve_checkpoint_dir
from megatron_keye.runtime.frozen_model import build_frozen_model
from megatron_keye.runtime.metrics import (
    MetricsSink,
    flops_per_token,
    peak_flops,
    peak_memory_bytes,
)
from megatron_keye.runtime.optim import (
    build_optimizer,
    build_scheduler,
    freeze_parameters,
    guarded_step,
    wrap_with_ddp,
)
from megatron_keye.runtime.parallel import ParallelDims
from megatron_keye.runtime.step import LOSS_KEY, ModelStep

log = logging.getLogger(__name__)

# Signals that end a run cleanly: save at the next step boundary, then return (exit code 0).
# SIGUSR1 is what `sbatch --signal=USR1@120` sends before the time limit; SIGTERM is a requeue,
# a preemption or a plain `kill`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    """Raised after `stage.max_consecutive_nonfinite` skipped steps in a row."""


@dataclass
class StepResult:
    """Global (all-reduced) outcome of one training step; identical on every rank."""

    loss: float
    tokens: int  # every token the model processed in the global batch
    loss_tokens: int  # the units the loss was averaged over (loss-masked tokens excluded)
    grad_norm: float
    applied: bool
    lr: float
    step_time_s: float
    reports: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Owns the model chunks, optimizer, scheduler, data loader and checkpoints of one run."""

    def __init__(self, config: TrainConfig, *, loss_head: LossHead | None = None, loader=None):
        self.config = config
        self.loss_head = loss_head
        self.loader = loader
        self.iteration = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.stop_signal: int | None = None  # set when a stop signal arrived (see STOP_SIGNALS)
        self._pending_signal: int | None = None

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Initialize processes, build model/optimizer/data and load a checkpoint if asked."""
        cfg = self.config
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size)
        self.dims = ParallelDims.from_config(cfg.parallel, world_size)
        self.device = self.dims.initialize(seed=cfg.seed)
        chunks = build_model_chunks(cfg, self.device)
        self.transformer_config = chunks[0].config
        frozen = freeze_parameters(chunks, cfg.stage.freeze)
        if frozen:
            log.info("froze %d parameter tensors matching %s", frozen, cfg.stage.freeze)
        self.model = wrap_with_ddp(chunks, self.transformer_config, cfg.parallel)
        self.optimizer = build_optimizer(
            self.model, cfg.optimizer, cfg.parallel, precision=cfg.precision
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.schedule)
        self._install_schedule_hooks()
        self.loss_head = self.loss_head or build_loss_head(
            cfg.stage.loss_head, head_config=cfg.stage.head, vocab_size=cfg.model.vocab_size
        )
        self.reference_model = None
        if getattr(self.loss_head, "uses_reference_model", False):
            self.reference_model = build_frozen_model(
                cfg, self.device, layout=self.layout(),
                source=getattr(self.loss_head, "reference_load", None) or cfg.checkpoint.load,
            )
        self.step_runner = ModelStep(
            model=self.model,
            loss_head=self.loss_head,
            device=self.device,
            seq_length=cfg.data.seq_length,
            micro_batch_size=cfg.schedule.micro_batch_size,
            reference_model=self.reference_model,
            vocab_size=cfg.model.vocab_size,
        )
        self.tokens_per_step = cfg.schedule.global_batch_size * cfg.data.seq_length
        if self.loader is None:
            self.loader = self._build_loader()
        self.checkpointer = Checkpointer(
            cfg.checkpoint, run_config=config_to_dict(cfg), layout=self.layout()
        )
        self.metrics = MetricsSink(
            cfg.logging, run_config=config_to_dict(cfg), is_writer=dist.get_rank() == 0
        )
        self._flops_per_token = flops_per_token(cfg.model, cfg.data.seq_length)
        self._peak = None
        self._maybe_load()
        self._log_summary()
        return self

    def _log_summary(self) -> None:
        local = sum(p.numel() for m in self.model for p in m.parameters())
        trainable = sum(p.numel() for m in self.model for p in m.parameters() if p.requires_grad)
        # Every parameter lives on exactly one (tensor, pipeline) rank of data-parallel rank 0.
        first_replica = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        counts = all_reduce_values([local, trainable] if first_replica else [0, 0])
        if dist.get_rank() == 0:
            cfg = self.config
            log.info(
                "model %s: %.2fM parameters (%.2fM trainable) | layout %s | %d micro-batches of "
                "%d x %d tokens per rank per step | starting at iteration %d of %d",
                cfg.model.flavor,
                counts[0].item() / 1e6,
                counts[1].item() / 1e6,
                self.layout(),
                num_microbatches(cfg, self.dims.world_size),
                cfg.schedule.micro_batch_size,
                cfg.data.seq_length,
                self.iteration,
                cfg.schedule.train_iters,
            )

    def layout(self) -> dict:
        """The parallel layout, stored with checkpoints."""
        d = self.dims
        return {
            "tensor": d.tensor,
            "pipeline": d.pipeline,
            "virtual_pipeline": d.virtual_pipeline,
            "context": d.context,
            "data": d.data,
        }

    def _install_schedule_hooks(self) -> None:
        tc = self.transformer_config
        tc.finalize_model_grads_func = finalize_model_grads
        tc.grad_scale_func = self.optimizer.scale_loss
        if self.config.parallel.overlap_grad_reduce:
            no_sync = [m.no_sync for m in self.model]
            tc.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self.config.parallel.overlap_param_gather:
            tc.param_sync_func = [m.start_param_sync for m in self.model]
            if len(self.model) == 1:
                tc.param_sync_func = tc.param_sync_func[0]

    def _build_loader(self):
        if self.config.stage.loss_head == "gspo":  # RL: batches are rollouts of this model
            # The one import up into post_training/: `Trainer(config).setup()` builds an RL
            # stage's loader by itself; a factory registered from above would make that depend
            # on who imported post_training first.
            from megatron_keye.post_training.rl import RolloutSource

            return RolloutSource(self.config, trainer=self)
        from megatron_keye.data.loaders import build_data_loader

        return build_data_loader(self.config)

    # ------------------------------------------------------------------------------- step
    def forward_backward(self, microbatches: list[dict], *, force_all_reduce: bool = False):
        """Run the pipeline schedule over this rank's micro-batches; gradients end finalized.

        Returns the loss reports of the micro-batches (last pipeline stage; empty elsewhere).
        """
        return self.step_runner.run(microbatches, force_all_reduce=force_all_reduce)

    @torch.no_grad()
    def evaluate(self, microbatches: list[dict]) -> tuple[float, int]:
        """Global mean loss and valid-unit count of a batch without updating anything."""
        self.finish_param_sync()
        for chunk in self.model:
            chunk.eval()
        try:
            reports = self.step_runner.run(microbatches, forward_only=True)
        finally:
            for chunk in self.model:
                chunk.train()
        total, count = self.step_runner.global_reports(reports)[LOSS_KEY]
        return (total / count if count else float("nan")), int(count)

    def train_step(self, microbatches: list[dict]) -> StepResult:
        """One optimizer step on one global batch (this rank's share of it)."""
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(microbatches)
        totals = self.step_runner.global_reports(reports)
        loss_sum, count = totals.pop(LOSS_KEY)
        finite = math.isfinite(loss_sum) and count > 0
        end_step = getattr(self.loss_head, "end_step", None)
        if end_step is not None and finite:
            end_step(totals, training=True)  # running head state (BCO's reward shift)
        # The rate this update uses (the scheduler then moves on to the next step's).
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0
        outcome = guarded_step(self.optimizer, loss_is_finite=finite)
        if outcome.applied:
            self.scheduler.step(increment=1)
        return StepResult(
            loss=loss_sum / count if count else float("nan"),
            tokens=self.tokens_per_step,
            loss_tokens=int(count),
            grad_norm=outcome.grad_norm,
            applied=outcome.applied,
            lr=lr,
            step_time_s=time.perf_counter() - start,
            reports={k: s / c if c else float("nan") for k, (s, c) in totals.items()},
        )

    def finish_param_sync(self) -> None:
        """Make every rank's parameters current before anyone reads them outside a step.

        With `parallel.overlap_param_gather` the distributed optimizer leaves the all-gather of
        updated parameters to the next forward pass; a checkpoint, an export or an evaluation
        in between would read stale weights. This gathers them now (a no-op otherwise).
        """
        if not (self.config.parallel.distributed_optimizer
                and self.config.parallel.overlap_param_gather):
            return
        for chunk in self.model:
            chunk.start_param_sync(force_sync=True)

    # ------------------------------------------------------------------------------- loop
    def run(self) -> list[StepResult]:
        """Train to `schedule.train_iters`, logging and checkpointing; returns the step results.

        A stop signal (SIGTERM, SIGUSR1) ends the run at the next step boundary with a
        checkpoint, and `run` returns normally so the process exits 0 and a requeued job resumes.
        """
        cfg = self.config
        history = []
        last_saved = self.iteration if self._loaded_from is not None else None
        stop = cfg.schedule.train_iters
        if cfg.schedule.exit_at_iteration:
            stop = min(stop, cfg.schedule.exit_at_iteration)
        previous_handlers = self._install_signal_handlers()
        try:
            while self.iteration < stop:
                result = self.train_step(self.loader.next_step())
                self.iteration += 1
                history.append(result)
                self._account(result)
                if (
                    self.iteration % cfg.logging.log_interval == 0
                    or not result.applied
                    or len(history) == 1
                ):
                    self._log(result)
                if (
                    cfg.checkpoint.save_interval
                    and self.iteration % cfg.checkpoint.save_interval == 0
                ):
                    self.save()
                    last_saved = self.iteration
                if self._stop_requested():
                    break
            stopping_early = self.iteration < cfg.schedule.train_iters
            if (
                cfg.checkpoint.save_dir
                and last_saved != self.iteration
                and (cfg.checkpoint.save_at_end or stopping_early)
            ):
                self.save()
            elif self.stop_signal is not None and not cfg.checkpoint.save_dir:
                log.warning("stopping without a checkpoint: checkpoint.save_dir is not set")
            self.finish_param_sync()
        finally:
            self._restore_signal_handlers(previous_handlers)
            self.metrics.close()
            if hasattr(self.loader, "close"):
                self.loader.close()  # stop loader workers; a later step restarts them in place
        return history

    def _install_signal_handlers(self) -> dict:
        """Catch the stop signals (main thread only; elsewhere signals cannot be handled)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, _frame):
            self._pending_signal = signum

        return {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal; every rank gets the same answer.

        Slurm signals every task, but a signal sent to one process must still stop all of
        them at the same step, so the flag is all-reduced (one 8-byte collective per step).
        """
        local = self._pending_signal or 0
        received = int(all_reduce_values([local], op=dist.ReduceOp.MAX)[0].item())
        if received:
            self.stop_signal = received
            if dist.get_rank() == 0:
                log.warning(
                    "received %s: saving a checkpoint at iteration %d and stopping",
                    signal.Signals(received).name,
                    self.iteration,
                )
        return bool(received)

    def _account(self, result: StepResult) -> None:
        if result.applied:
            self.consecutive_nonfinite = 0
            return
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        if dist.get_rank() == 0:
            log.warning(
                "step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update "
                "skipped (%d in a row)",
                self.iteration,
                result.loss,
                result.grad_norm,
                self.consecutive_nonfinite,
            )
        limit = self.config.stage.max_consecutive_nonfinite
        if self.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"stopping at step {self.iteration}: {self.consecutive_nonfinite} consecutive "
                f"non-finite steps (stage.max_consecutive_nonfinite={limit}); the last "
                f"checkpoint is intact"
            )

    def _log(self, result: StepResult) -> None:
        seconds = result.step_time_s
        tokens_per_s = result.tokens / seconds if seconds > 0 else 0.0
        if self._peak is None:
            self._peak = peak_flops(
                self.device,
                dtype=torch.bfloat16 if self.config.precision == "bf16" else torch.float32,
            )
        mem = all_reduce_values([float(peak_memory_bytes())], op=dist.ReduceOp.MAX)
        metrics = {
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "tokens_per_s": tokens_per_s,
            "loss_tokens_per_s": result.loss_tokens / seconds if seconds > 0 else 0.0,
            "mfu": tokens_per_s * self._flops_per_token / (self._peak * dist.get_world_size()),
            "peak_mem_gb": mem.item() / 2**30,
            "step_time_s": seconds,
            "skipped_steps": self.skipped_steps,
            **{f"report/{k}": v for k, v in result.reports.items()},
            # The shard loader's skipped/overlong sample counts (collective over data ranks).
            **(self.loader.metrics() if hasattr(self.loader, "metrics") else {}),
        }
        self.metrics.log(self.iteration, metrics, total_steps=self.config.schedule.train_iters)

    # ------------------------------------------------------------------------ checkpoints
    def training_state(self) -> TrainingState:
        return TrainingState(
            iteration=self.iteration,
            scheduler=self.scheduler.state_dict(),
            data=self.loader.state_dict(),
            counters={"skipped_steps": self.skipped_steps},
            head=self.loss_head.state_dict() if hasattr(self.loss_head, "state_dict") else None,
        )

    def save(self):
        """Write a checkpoint of the current state (collective)."""
        if not self.config.checkpoint.save_dir:
            raise ValueError("checkpoint.save_dir: required to save")
        self.finish_param_sync()
        path = self.checkpointer.save(
            chunks=self.model, optimizer=self.optimizer, state=self.training_state()
        )
        if dist.get_rank() == 0:
            log.info("saved checkpoint %s", path)
        return path

    def _maybe_load(self) -> None:
        """Resume from our own `save_dir` if it holds a checkpoint, else seed from `load`.

        `checkpoint.load` only starts a fresh run (fine-tuning from base weights); a requeued
        job whose `save_dir` already holds checkpoints continues from its own latest one
        instead of starting over and overwriting them.
        """
        cfg = self.config.checkpoint
        self._loaded_from = None
        own = cfg.save_dir and resolve_checkpoint_dir(cfg.save_dir) is not None
        if own:
            source, weights_only, why = cfg.save_dir, False, "resuming this run from its save_dir"
            if cfg.load and dist.get_rank() == 0:
                log.info("checkpoint.load=%s is ignored: %s holds this run's checkpoints",
                         cfg.load, cfg.save_dir)
        elif cfg.load:
            weights_only = cfg.load_weights_only or cfg.load_state == "weights"
            scope = "weights" if weights_only else cfg.load_state
            source, why = cfg.load, f"starting from checkpoint.load ({scope})"
            if cfg.load_state == "weights+optimizer":
                from megatron_keye.stages import check_optimizer_transfer

                check_optimizer_transfer(cfg.load, self.config)
        else:
            return
        # This run's optimizer hyper-parameters (lr, max_lr/min_lr the scheduler reads, weight
        # decay, betas): a weights+optimizer load keeps the saved moments, not the saved settings.
        hyper = [{k: v for k, v in group.items() if k not in ("params", "step")}
                 for group in self.optimizer.param_groups]
        state = self.checkpointer.load(
            source,
            chunks=self.model,
            optimizer=self.optimizer,
            weights_only=weights_only,
        )
        self._loaded_from = source
        if weights_only or state is None:
            if dist.get_rank() == 0:
                log.info("%s: loaded weights from %s", why, source)
            return
        if not own and cfg.load_state == "weights+optimizer":
            # A new stage that keeps the Adam moments but runs its own LR schedule from step 0
            # on its own data: the loaded param groups carry the old stage's rates and limits.
            groups = self.optimizer.param_groups
            if len(groups) != len(hyper):
                raise ValueError(f"checkpoint.load_state: {source} has {len(groups)} optimizer "
                                 f"parameter groups, this run {len(hyper)}; use weights")
            for group, settings in zip(groups, hyper, strict=True):
                group.update(settings)
            self.scheduler.step(increment=0)
            if dist.get_rank() == 0:
                log.info("%s: loaded weights and optimizer state from %s; LR schedule, "
                         "iteration and data order start fresh", why, source)
            return
        self.iteration = state.iteration
        if state.scheduler:
            self.scheduler.load_state_dict(state.scheduler)
        if state.data:
            self.loader.load_state_dict(state.data)
        self.skipped_steps = (state.counters or {}).get("skipped_steps", 0)
        if state.head and hasattr(self.loss_head, "load_state_dict"):
            self.loss_head.load_state_dict(state.head)
        if dist.get_rank() == 0:
            log.info("%s: loaded %s at iteration %d", why, source, self.iteration)
