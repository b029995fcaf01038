"""Policy-gradient loss over RL rollouts: GSPO, GSPO-token, and GRPO for comparison.

Every sample of a (packed, possibly CP-split) row is one response; its tokens carry the sampling
policy's log-probs (`old_logprobs`, pi_old) and its advantage (`advantages`, the sample's
group-normalized reward repeated over its response tokens; per-token for GSPO-token). Response
tokens are the trained ones (`loss_weights` != 0 and a real label); prompts and padding are not.

- `gspo` (Zheng et al. 2025): s_i = exp(mean_t log(pi/pi_old)) per sample, from per-sample
  sums all-reduced over CP before the exp (`heads/sequence.py`); the sample's loss is
  max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)).
- `gspo_token`: s_i,t = sg(s_i) * pi_t / sg(pi_t) (value s_i, gradient of token t's log-prob),
  with per-token advantages; equal to `gspo` in value and gradient when advantages are uniform.
- `grpo`: the per-token ratio pi_t / pi_old,t (log clamped at +-20) in the same clipped form.
- `kl_coef` > 0 adds beta * k3 KL to the reference per token (exp(d) - d - 1, d = ref - log pi,
  clamped to [-10, 10]).
Aggregation: `seq-mean-token-mean` (GSPO's and veRL's): each sample's token mean, averaged over
the samples of the global batch; `token-mean`: the mean over every response token. Following
the sequence helper's convention, sample counts and sample-level terms are counted on CP rank 0,
token terms on every rank for its own tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_keye.data.batch import (
    ADVANTAGES,
    LABELS,
    OLD_LOGPROBS,
    REF_LOGPROBS,
    SAMPLE_IDS,
)
from megatron_keye.heads.base import HeadBase, HeadNeeds, Report, register_loss_head, report_entry
from megatron_keye.heads.logprobs import vocab_parallel_logprobs
from megatron_keye.heads.sequence import (
    context_parallel_group,
    counted_on_this_cp_rank,
    num_sample_slots,
    sample_sums,
)
from megatron_keye.heads.sft import supervised_mask

GRPO_LOG_RATIO_MAX = 20.0
KL_MAX = 10.0


def clipped_objective(ratio: torch.Tensor, advantage: torch.Tensor, *, low: float,
                      high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipped) elementwise: max(-A r, -A clip(r, 1 - low, 1 + high)), and where the
    clipped branch is the one taken (its gradient is zero)."""
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - log pi."""
    d = (ref_logp - logp).clamp(-KL_MAX, KL_MAX)
    return (torch.exp(d) - d - 1.0).clamp(-KL_MAX, KL_MAX)


@register_loss_head("gspo")
class PolicyGradientLoss(HeadBase):
    """GSPO / GSPO-token / GRPO on rollouts (see the module docstring); `stage.head.gspo`."""

    needs = HeadNeeds(sample_ids=True)
    config_section = "gspo"

    def __init__(self, *, config=None, vocab_size: int | None = None):
        if config is None:
            from megatron_keye.config.schema import PolicyGradientHeadConfig

            config = PolicyGradientHeadConfig()
        super().__init__(config=config, vocab_size=vocab_size)
        if config.kl_coef < 0 or config.clip_low < 0 or config.clip_high < 0:
            raise ValueError("stage.head.gspo: kl_coef, clip_low and clip_high must be >= 0")
        if config.kl_coef > 0:
            self.needs = HeadNeeds(sample_ids=True, reference_logprobs=True)

    def __call__(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        cfg = self.config
        for field in (OLD_LOGPROBS, ADVANTAGES) + ((REF_LOGPROBS,) if cfg.kl_coef > 0 else ()):
            if field not in batch:
                raise ValueError(f"gspo head: the batch has no {field!r} field (rollout batches "
                                 f"carry old_logprobs and advantages per token)")
        logp, entropy = vocab_parallel_logprobs(output, batch[LABELS].transpose(0, 1),
                                                vocab_size=self.vocab_size)
        logp, entropy = logp.transpose(0, 1), entropy.detach().transpose(0, 1)  # [b, s]
        mask = supervised_mask(batch)
        old = batch[OLD_LOGPROBS].float()
        advantage = batch[ADVANTAGES].float() * mask
        group = context_parallel_group()
        sample_ids = batch.get(SAMPLE_IDS)
        slots = num_sample_slots(sample_ids, group=group)
        ids = (sample_ids.long() if sample_ids is not None
               else torch.zeros_like(mask, dtype=torch.long))

        def per_sample(values: torch.Tensor) -> torch.Tensor:
            return sample_sums(values, sample_ids, num_slots=slots, group=group)

        with torch.no_grad():
            lengths = per_sample(mask.double()).float()  # [b, slots] response tokens per sample
        present = lengths > 0
        n = lengths.clamp(min=1.0)
        on_rank = counted_on_this_cp_rank()
        kl = k3_kl(logp, batch[REF_LOGPROBS].float()) * mask if cfg.kl_coef > 0 else None

        if cfg.variant == "grpo":
            ratio = torch.exp((logp - old).clamp(-GRPO_LOG_RATIO_MAX, GRPO_LOG_RATIO_MAX))
        else:
            mean_log_ratio = per_sample((logp - old) * mask) / n
            log_s = mean_log_ratio.clamp(max=cfg.log_ratio_max)
            if cfg.variant == "gspo_token":
                ratio = torch.exp(logp - logp.detach() + log_s.detach().gather(1, ids))
            elif cfg.variant != "gspo":
                raise ValueError(f"stage.head.gspo.variant: unknown {cfg.variant!r}")

        if cfg.variant == "gspo":
            s = torch.exp(log_s)
            with torch.no_grad():
                sample_advantage = per_sample(advantage) / n
            loss_i, clipped_i = clipped_objective(s, sample_advantage, low=cfg.clip_low,
                                                  high=cfg.clip_high)
            loss_i = loss_i * present
            if cfg.loss_agg == "seq-mean-token-mean":
                total = loss_i.sum() * float(on_rank)
                if kl is not None:
                    total = total + cfg.kl_coef * (kl / n.gather(1, ids)).sum()
            else:  # every response token carries its sample's loss
                total = (loss_i.gather(1, ids) * mask).sum()
                if kl is not None:
                    total = total + cfg.kl_coef * kl.sum()
            ratio_sum = (s.detach() * present).sum()
            clipped_sum = (clipped_i & present).sum()
            ratio_units = present.sum()
        else:
            loss_t, clipped_t = clipped_objective(ratio, advantage, low=cfg.clip_low,
                                                  high=cfg.clip_high)
            if kl is not None:
                loss_t = loss_t + cfg.kl_coef * kl
            loss_t = loss_t * mask
            if cfg.loss_agg == "seq-mean-token-mean":
                total = (loss_t / n.gather(1, ids)).sum()
            else:
                total = loss_t.sum()
            ratio_sum = (ratio.detach() * mask).sum()
            clipped_sum = (clipped_t & (mask > 0)).sum()
            ratio_units = mask.sum()

        samples = present.sum() * int(on_rank)
        tokens = mask.sum()
        count = (samples if cfg.loss_agg == "seq-mean-token-mean" else tokens).to(torch.int)
        sample_units = ratio_units * (int(on_rank) if cfg.variant == "gspo" else 1)
        report = {
            "policy loss": report_entry(total, count),
            "ratio": report_entry(ratio_sum * (float(on_rank) if cfg.variant == "gspo" else 1.0),
                                  sample_units),
            "clip fraction": report_entry(
                clipped_sum.float() * (float(on_rank) if cfg.variant == "gspo" else 1.0),
                sample_units),
            "entropy": report_entry((entropy * mask).sum(), tokens),
            "response length": report_entry(lengths.sum() * float(on_rank), samples),
        }
        if kl is not None:
            report["kl"] = report_entry(kl.detach().sum(), tokens)
        return total, count, report
