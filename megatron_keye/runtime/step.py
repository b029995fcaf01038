"""The model step: micro-batches → megatron-core's pipeline schedule → loss head → global sums.

`ModelStep` is what the trainer calls for one global batch, forward and backward or forward
only. It moves each micro-batch to the device, runs this rank's model chunks under the schedule
of the layout (no pipelining, 1F1B or interleaved), hands the last stage's output to the loss
head and sums the heads' [sum, count] reports over micro-batches, pipeline stages and
data×context ranks. Under context parallelism each micro-batch is first cut to this rank's
zig-zag share (`runtime/context_split.py`); the loss sums then add up over the CP ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_keye.data.batch import REF_LOGPROBS, VISION_FIELDS
from megatron_keye.heads import LossHead
from megatron_keye.heads.base import report_entry
from megatron_keye.ops.collectives import all_reduce_values
from megatron_keye.runtime.context_split import split_for_context_parallel

# The report entry holding the (sum, count) the gradients were computed from.
LOSS_KEY = "__loss__"
# Where the reference pass leaves a micro-batch's (CP-local) reference log-probs for the policy's.
_REFERENCE_STASH = "__reference_logprobs__"


class ModelStep:
    """Runs global batches through this rank's model chunks and a loss head."""

    def __init__(
        self,
        *,
        model: list[torch.nn.Module],
        loss_head: LossHead,
        device: torch.device,
        seq_length: int,
        micro_batch_size: int,
        reference_model: list[torch.nn.Module] | None = None,
        vocab_size: int | None = None,
    ):
        self.model = model
        # A frozen reference (same layout) whose log p(label) fills `ref_logprobs` each step.
        self.reference_model = reference_model
        self.vocab_size = vocab_size
        self.loss_head = loss_head
        self.device = device
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self._report_names: list[str] | None = None
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()

    def run(self, microbatches: list[Mapping[str, torch.Tensor]], *, forward_only: bool = False,
            force_all_reduce: bool = False) -> list[dict]:
        """megatron-core's schedule over this rank's micro-batches.

        Returns the loss reports of the micro-batches (last pipeline stage; empty elsewhere).
        With `forward_only=False` the gradients end finalized (reduced over data ranks).
        """
        microbatches = [dict(mb) for mb in microbatches]  # the reference pass stashes into them
        self._begin_step(microbatches)
        if self.reference_model is not None:
            self._reference_pass(microbatches)
        vpp = len(self.model)
        iterators = [iter(microbatches) for _ in range(vpp)]
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if vpp > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
            force_all_reduce=force_all_reduce,
        )

    def _begin_step(self, microbatches) -> None:
        """Global-batch sums a head asked for (`batch_statistics`), before any forward.

        Every rank sees unsplit micro-batches (CP cuts them in the forward step), so the sums
        add over micro-batches and the data-parallel group only.
        """
        statistics = getattr(self.loss_head, "batch_statistics", None)
        if statistics is None:
            return
        totals: dict[str, float] = {}
        for mb in microbatches:
            for name, value in statistics(mb).items():
                totals[name] = totals.get(name, 0.0) + float(value)
        if totals:
            names = sorted(totals)
            summed = all_reduce_values([totals[n] for n in names],
                                       group=parallel_state.get_data_parallel_group())
            totals = {n: summed[i].item() for i, n in enumerate(names)}
        self.loss_head.begin_step(totals)

    def _reference_pass(self, microbatches) -> None:
        """Forward the frozen reference over the micro-batches (no grad); the last stage
        stashes each one's log p(label), in this rank's CP share, for the policy's loss head."""
        from megatron_keye.heads.logprobs import vocab_parallel_logprobs

        def forward_step(data_iterator, model):
            source = next(data_iterator)
            batch = self._device_batch(source)
            output = _model_forward(model, batch)

            def stash(output):
                logp, _ = vocab_parallel_logprobs(output, batch["labels"].transpose(0, 1),
                                                  vocab_size=self.vocab_size, with_entropy=False)
                source[_REFERENCE_STASH] = logp.transpose(0, 1).detach().float()
                zero = output.new_zeros(())
                return zero, torch.zeros((), dtype=torch.int, device=zero.device), {}

            return output, stash

        vpp = len(self.reference_model)
        iterators = [iter(microbatches) for _ in range(vpp)]
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if vpp > 1 else iterators[0],
                model=self.reference_model,
                num_microbatches=len(microbatches),
                seq_length=self.seq_length,
                micro_batch_size=self.micro_batch_size,
                forward_only=True,
            )

    def _device_batch(self, source) -> dict[str, torch.Tensor]:
        """A micro-batch on the device, cut to this rank's CP share, reference log-probs in."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in source.items()
                 if k != _REFERENCE_STASH}
        if self.cp_size > 1:
            batch = split_for_context_parallel(batch, cp_size=self.cp_size, cp_rank=self.cp_rank)
        if _REFERENCE_STASH in source:
            batch[REF_LOGPROBS] = source[_REFERENCE_STASH]
        return batch

    def _forward_step(self, data_iterator, model):
        batch = self._device_batch(next(data_iterator))
        output = _model_forward(model, batch)
        return output, functools.partial(self._compute_loss, batch)

    def _compute_loss(self, batch, output):
        total, count, report = self.loss_head(output, batch)
        return total, count, {**report, LOSS_KEY: report_entry(total, count)}

    def global_reports(self, reports: list[dict]) -> dict[str, tuple[float, float]]:
        """Sum [sum, count] reports over micro-batches, then over pipeline and data ranks.

        Only the last pipeline stage holds reports; tensor-parallel peers hold identical ones,
        so the reduction runs over the pipeline group and the data(×context) group only.
        The result is identical on every rank.
        """
        if self._report_names is None:
            self._report_names = _broadcast_names(sorted({k for r in reports for k in r}))
        names = self._report_names
        vec = torch.zeros(2 * len(names), dtype=torch.float64)
        for r in reports:
            for i, name in enumerate(names):
                if name in r:
                    vec[2 * i : 2 * i + 2] += r[name].detach().double().cpu()
        vec = all_reduce_values(vec, group=parallel_state.get_pipeline_model_parallel_group())
        vec = all_reduce_values(
            vec, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        return {name: (vec[2 * i].item(), vec[2 * i + 1].item()) for i, name in enumerate(names)}


def _model_forward(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One model chunk on a (CP-cut) micro-batch; images and video frames (the whole
    micro-batch's, never CP-cut) go to a vision model, which uses them on its first stage."""
    vision = {name: batch[name] for name in VISION_FIELDS if name in batch}
    if vision and not getattr(getattr(model, "module", model), "consumes_vision", False):
        raise ValueError(f"batch has {sorted(vision)} but the model has no vision tower "
                         f"(model.vision is not set)")
    return model(batch["tokens"], batch["position_ids"], segments=batch.get("sample_ids"),
                 positions=batch.get("positions"), **vision)


def _broadcast_names(names: list[str]) -> list[str]:
    """Report names known on the last pipeline stage, shared with every rank."""
    holder = [names]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(
        holder, src=last, group=parallel_state.get_pipeline_model_parallel_group()
    )
    return holder[0]
