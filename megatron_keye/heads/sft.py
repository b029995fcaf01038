"""Supervised fine-tuning: next-token loss on assistant tokens with token/sample/square averaging.

The chat template decides what is trained: the batch's `loss_weights` are 0 on system/user
turns, template scaffolding and vision placeholders and 1 (or a per-token weight) on assistant
tokens including the turn end; labels of -100 are never trained either. Sample i with n_i
supervised tokens gives each of its tokens the weight w = loss_weight * f(n_i) with
f = 1 (`token`), 1/n_i (`sample`) or 1/sqrt(n_i) (`square`, InternVL2.5's choice), and the loss
is sum(w * nll) / sum(w) over the *global* batch. sum(w) is computed from the unsplit
micro-batches before the micro-batch loop and summed over data-parallel ranks
(`batch_statistics`); the head then returns `sum(w * nll) * N / W` with the count N of
supervised tokens, so the trainer's one division by the global N gives the weighted mean, and
with every weight 1 (`token`) it is exactly the `lm` head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_keye.data.batch import LABELS, LOSS_WEIGHTS, SAMPLE_IDS
from megatron_keye.heads.base import HeadBase, HeadNeeds, Report, register_loss_head, report_entry
from megatron_keye.heads.logprobs import vocab_parallel_logprobs
from megatron_keye.heads.sequence import context_parallel_group, num_sample_slots, sample_sums

IGNORE_INDEX = -100


def supervised_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[b, s] float: 1 where a token is trained (nonzero loss weight and a real label)."""
    return ((batch[LOSS_WEIGHTS] != 0) & (batch[LABELS] != IGNORE_INDEX)).float()


def length_weight(n: torch.Tensor, loss_avg: str) -> torch.Tensor:
    """f(n) of `loss_avg` for supervised-token counts n (0 where n is 0)."""
    n = n.double()
    if loss_avg == "token":
        f = torch.ones_like(n)
    elif loss_avg == "sample":
        f = 1.0 / n.clamp(min=1)
    elif loss_avg == "square":
        f = 1.0 / n.clamp(min=1).sqrt()
    else:
        raise ValueError(f"stage.head.sft.loss_avg: unknown {loss_avg!r}")
    return torch.where(n > 0, f, torch.zeros_like(f))


def sample_token_weights(batch: Mapping[str, torch.Tensor], loss_avg: str, *,
                         group=None) -> torch.Tensor:
    """[b, s] float64 per-token weights w = loss_weight * f(n_sample) (0 on untrained tokens).

    n is counted over the whole sample: over the CP `group` when the batch is a CP share.
    """
    mask = supervised_mask(batch)
    weights = batch[LOSS_WEIGHTS].double() * mask.double()
    if loss_avg == "token":
        return weights
    sample_ids = batch.get(SAMPLE_IDS)
    slots = num_sample_slots(sample_ids, group=group)
    with torch.no_grad():
        counts = sample_sums(mask.double(), sample_ids, num_slots=slots, group=group)
    f = length_weight(counts, loss_avg)  # [b, slots]
    ids = sample_ids.long() if sample_ids is not None else torch.zeros_like(mask, dtype=torch.long)
    return weights * f.gather(1, ids)


@register_loss_head("sft")
class SupervisedFineTuningLoss(HeadBase):
    """Assistant-only NLL with `stage.head.sft.loss_avg` averaging (see the module docstring)."""

    needs = HeadNeeds(sample_ids=True)
    config_section = "sft"

    def __init__(self, *, config=None, vocab_size: int | None = None):
        if config is None:
            from megatron_keye.config.schema import SFTHeadConfig

            config = SFTHeadConfig()
        super().__init__(config=config, vocab_size=vocab_size)
        self.loss_avg = config.loss_avg
        self._scale: float | None = None  # N / W of the current global batch

    def batch_statistics(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        weights = sample_token_weights(batch, self.loss_avg, group=None)
        return {"sft/tokens": float(supervised_mask(batch).sum()),
                "sft/weight": float(weights.sum())}

    def begin_step(self, statistics: Mapping[str, float]) -> None:
        tokens, weight = statistics["sft/tokens"], statistics["sft/weight"]
        self._scale = tokens / weight if weight > 0 else 0.0

    def __call__(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        if self._scale is None:
            raise RuntimeError("sft head: begin_step(global statistics) was not called "
                               "(the model step calls it before the micro-batch loop)")
        labels = batch[LABELS].transpose(0, 1)
        logp, entropy = vocab_parallel_logprobs(output, labels, vocab_size=self.vocab_size)
        nll = -logp.transpose(0, 1)  # [b, s]
        mask = supervised_mask(batch)
        weights = sample_token_weights(batch, self.loss_avg, group=context_parallel_group())
        weighted = (nll * weights.to(nll.dtype)).sum()
        total = weighted * self._scale  # scale = N / W: exactly 1 when every weight is 1
        count = mask.sum().to(torch.int)
        token_nll = (nll.detach() * mask).sum()
        token_entropy = (entropy.detach().transpose(0, 1) * mask).sum()
        return total, count, {
            "sft loss": report_entry(total, count),
            "nll per token": report_entry(token_nll, count),
            "entropy": report_entry(token_entropy, count),
        }

