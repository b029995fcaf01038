"""The training loop: schedule → finalize grads → (skip if non-finite) clip → step → log → save.

`Trainer.setup()` builds everything from a `TrainConfig`; `train_step(microbatches)` runs one
global batch through megatron-core's pipeline schedule (no pipelining, 1F1B or interleaved) and
the optimizer; `run()` loops, logs and checkpoints. Losses come from a loss head as (sum, count);
gradients are divided once by the global count (megatron's per-token mode), so micro-batching,
data parallelism and pipelining never change the math.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_keye.config import config_to_dict, num_microbatches, validate
from megatron_keye.config.schema import TrainConfig
from megatron_keye.heads import LossHead, build_loss_head
from megatron_keye.heads.base import report_entry
from megatron_keye.models.keye_vl.builder import build_model_chunks
from megatron_keye.runtime.checkpoint import Checkpointer, TrainingState, resolve_checkpoint_dir
from megatron_keye.runtime.metrics import (
    MetricsSink,
    flops_per_token,
    measured_matmul_peak,
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

log = logging.getLogger(__name__)

# The report entry holding the (sum, count) the gradients were computed from.
LOSS_KEY = "__loss__"


class NonFiniteLossError(RuntimeError):
    """Raised after `stage.max_consecutive_nonfinite` skipped steps in a row."""


@dataclass
class StepResult:
    """Global (all-reduced) outcome of one training step; identical on every rank."""

    loss: float
    tokens: int
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
        self._report_names: list[str] | None = None

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
        self.loss_head = self.loss_head or build_loss_head(cfg.stage.loss_head)
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
        counts = torch.tensor([local, trainable], dtype=torch.float64)
        # Every parameter lives on exactly one (tensor, pipeline) rank of data-parallel rank 0.
        if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
            counts.zero_()
        dist.all_reduce(counts)
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
        from megatron_keye.data.text_dataset import TextBatchLoader, build_text_dataset

        cfg = self.config
        return TextBatchLoader(
            build_text_dataset(cfg.data),
            global_batch_size=cfg.schedule.global_batch_size,
            micro_batch_size=cfg.schedule.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
        )

    # ------------------------------------------------------------------------------- step
    def forward_backward(self, microbatches: list[dict], *, force_all_reduce: bool = False):
        """Run the pipeline schedule over this rank's micro-batches; gradients end finalized.

        Returns the loss reports of the micro-batches (last pipeline stage; empty elsewhere).
        """
        return self._run_schedule(
            microbatches, forward_only=False, force_all_reduce=force_all_reduce
        )

    @torch.no_grad()
    def evaluate(self, microbatches: list[dict]) -> tuple[float, int]:
        """Global mean loss and valid-unit count of a batch without updating anything."""
        for chunk in self.model:
            chunk.eval()
        try:
            reports = self._run_schedule(microbatches, forward_only=True)
        finally:
            for chunk in self.model:
                chunk.train()
        total, count = self._global_reports(reports)[LOSS_KEY]
        return (total / count if count else float("nan")), int(count)

    def _run_schedule(self, microbatches: list[dict], **schedule_kwargs):
        """megatron-core's schedule for this layout (no pipeline, 1F1B or interleaved)."""
        vpp = len(self.model)
        iterators = [iter(microbatches) for _ in range(vpp)]
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if vpp > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=self.config.data.seq_length,
            micro_batch_size=self.config.schedule.micro_batch_size,
            **schedule_kwargs,
        )

    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"])
        return output, functools.partial(self._compute_loss, batch)

    def _compute_loss(self, batch, output):
        total, count, report = self.loss_head(output, batch)
        return total, count, {**report, LOSS_KEY: report_entry(total, count)}

    def train_step(self, microbatches: list[dict]) -> StepResult:
        """One optimizer step on one global batch (this rank's share of it)."""
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(microbatches)
        totals = self._global_reports(reports)
        loss_sum, count = totals.pop(LOSS_KEY)
        finite = math.isfinite(loss_sum) and count > 0
        outcome = guarded_step(self.optimizer, loss_is_finite=finite)
        if outcome.applied:
            self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0
        return StepResult(
            loss=loss_sum / count if count else float("nan"),
            tokens=int(count),
            grad_norm=outcome.grad_norm,
            applied=outcome.applied,
            lr=lr,
            step_time_s=time.perf_counter() - start,
            reports={k: s / c if c else float("nan") for k, (s, c) in totals.items()},
        )

    def _global_reports(self, reports: list[dict]) -> dict[str, tuple[float, float]]:
        """Sum [sum, count] reports over micro-batches, then over pipeline and data ranks.

        Only the last pipeline stage holds reports; tensor-parallel peers hold identical ones,
        so the reduction runs over the pipeline group and the data(×context) group only.
        """
        if self._report_names is None:
            self._report_names = _broadcast_names(sorted({k for r in reports for k in r}))
        names = self._report_names
        vec = torch.zeros(2 * len(names), dtype=torch.float64)
        for r in reports:
            for i, name in enumerate(names):
                if name in r:
                    vec[2 * i : 2 * i + 2] += r[name].detach().double().cpu()
        vec = vec.to(self.device)
        dist.all_reduce(vec, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(
            vec, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        vec = vec.cpu()
        return {name: (vec[2 * i].item(), vec[2 * i + 1].item()) for i, name in enumerate(names)}

    # ------------------------------------------------------------------------------- loop
    def run(self) -> list[StepResult]:
        """Train to `schedule.train_iters`, logging and checkpointing; returns the step results."""
        cfg = self.config
        history = []
        last_saved = self.iteration if self._loaded_from is not None else None
        stop = cfg.schedule.train_iters
        if cfg.schedule.exit_at_iteration:
            stop = min(stop, cfg.schedule.exit_at_iteration)
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
            if (
                cfg.checkpoint.save_dir
                and last_saved != self.iteration
                and (cfg.checkpoint.save_at_end or self.iteration < cfg.schedule.train_iters)
            ):
                self.save()
        finally:
            self.metrics.close()
        return history

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
        tokens_per_s = result.tokens / result.step_time_s if result.step_time_s > 0 else 0.0
        if self._peak is None:
            self._peak = measured_matmul_peak(
                device=self.device.type,
                dtype=torch.bfloat16 if self.config.precision == "bf16" else torch.float32,
            )
        mem = torch.tensor([float(peak_memory_bytes())], device=self.device)
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        metrics = {
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self._flops_per_token / (self._peak * dist.get_world_size()),
            "peak_mem_gb": mem.item() / 2**30,
            "step_time_s": result.step_time_s,
            "skipped_steps": self.skipped_steps,
            **{f"report/{k}": v for k, v in result.reports.items()},
        }
        self.metrics.log(self.iteration, metrics, total_steps=self.config.schedule.train_iters)

    # ------------------------------------------------------------------------ checkpoints
    def training_state(self) -> TrainingState:
        return TrainingState(
            iteration=self.iteration,
            scheduler=self.scheduler.state_dict(),
            data=self.loader.state_dict(),
            counters={"skipped_steps": self.skipped_steps},
        )

    def save(self):
        """Write a checkpoint of the current state (collective)."""
        if not self.config.checkpoint.save_dir:
            raise ValueError("checkpoint.save_dir: required to save")
        path = self.checkpointer.save(
            chunks=self.model, optimizer=self.optimizer, state=self.training_state()
        )
        if dist.get_rank() == 0:
            log.info("saved checkpoint %s", path)
        return path

    def _maybe_load(self) -> None:
        cfg = self.config.checkpoint
        self._loaded_from = None
        source = cfg.load
        if source is None and cfg.save_dir and resolve_checkpoint_dir(cfg.save_dir) is not None:
            source = cfg.save_dir  # auto-resume from our own save dir
        if source is None:
            return
        state = self.checkpointer.load(
            source,
            chunks=self.model,
            optimizer=self.optimizer,
            weights_only=cfg.load_weights_only,
        )
        self._loaded_from = source
        if cfg.load_weights_only:
            return
        self.iteration = state.iteration
        if state.scheduler:
            self.scheduler.load_state_dict(state.scheduler)
        if state.data:
            self.loader.load_state_dict(state.data)
        self.skipped_steps = (state.counters or {}).get("skipped_steps", 0)
        if dist.get_rank() == 0:
            log.info("resumed from %s at iteration %d", source, self.iteration)


def _broadcast_names(names: list[str]) -> list[str]:
    """Report names known on the last pipeline stage, shared with every rank."""
    holder = [names]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(
        holder, src=last, group=parallel_state.get_pipeline_model_parallel_group()
    )
    return holder[0]
