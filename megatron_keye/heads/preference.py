"""Preference heads: DPO (sigmoid, IPO), BCO-pair with a running reward shift, and MPO.

A pair is two consecutive samples of one packed row, chosen then rejected (`pair_role` 1/2 per
token), both in the same forward. For each sample the head sums log p(label) over its completion
tokens (nonzero `loss_weights`, label not -100) with `heads/sequence.py` (packed rows, CP shares
added over the CP group) and takes Δ = log π(y) - log π_ref(y) from the batch's per-token
`ref_logprobs` (precomputed, or filled by a frozen reference model each step). With β:
- sigmoid (DPO): -(1-ε) log σ(β(Δc - Δr)) - ε log σ(-β(Δc - Δr)), ε = label smoothing;
- ipo: (h - 1/(2β))², h = (Δc/|yc|) - (Δr/|yr|) (length-averaged log-ratios);
- bco_pair: -log σ(βΔc - δ) - log σ(-(βΔr - δ)), δ the running mean of the rewards βΔ of all
  previous global batches (Welford over the whole data-parallel batch: every reward counts once,
  whatever the layout; saved in the checkpoint). TRL updates δ with the current batch before
  using it; here the current batch enters after its step, which keeps δ independent of how the
  batch is split into micro-batches and ranks;
- sft: token-mean NLL of the chosen completions over the global batch (MPO's generation loss).
The loss is sum_k w_k · (term_k averaged over the global batch's pairs); the head's count is the
number of pairs (counted on CP rank 0), the sft term is rescaled by P/T (pairs over chosen tokens
of the global batch, from `batch_statistics`) so the trainer's one division by P gives its token
mean. `mpo` = [sigmoid, bco_pair, sft] with weights [0.8, 0.2, 1.0] (InternVL2.5-MPO).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from megatron_keye.data.batch import CHOSEN, LABELS, PAIR_ROLE, REF_LOGPROBS, SAMPLE_IDS
from megatron_keye.heads.base import HeadBase, HeadNeeds, Report, register_loss_head, report_entry
from megatron_keye.heads.logprobs import vocab_parallel_logprobs
from megatron_keye.heads.sequence import (
    context_parallel_group,
    counted_on_this_cp_rank,
    find_pairs,
    sample_sums,
)
from megatron_keye.heads.sft import supervised_mask

LOSS_TYPES = ("sigmoid", "ipo", "bco_pair", "sft")


class RunningMoments:
    """Welford mean/variance over every value ever added, combined batch by batch."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 0.0, 0.0

    def update(self, total: float, total_sq: float, count: float) -> None:
        """Add a batch given by its sum, sum of squares and size."""
        if count <= 0:
            return
        batch_mean = total / count
        batch_var = max(total_sq / count - batch_mean * batch_mean, 0.0)
        combined = self.count + count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * count + delta * delta * self.count * count / combined
        self.mean += delta * count / combined
        self.var = m2 / combined
        self.count = combined

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.mean, self.var, self.count = (float(state[k]) for k in ("mean", "var", "count"))


def chosen_token_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[b, s] float: completion tokens of chosen samples."""
    return supervised_mask(batch) * (batch[PAIR_ROLE] == CHOSEN).float()


class PreferenceLoss(HeadBase):
    """Weighted sum of preference terms over packed pairs (see the module docstring)."""

    needs = HeadNeeds(reference_logprobs=True, sample_ids=True, pair_roles=True)
    config_section = "preference"
    preset_types: tuple[str, ...] = ("sigmoid",)
    preset_weights: tuple[float, ...] = (1.0,)

    def __init__(self, *, config=None, vocab_size: int | None = None):
        if config is None:
            from megatron_keye.config.schema import PreferenceHeadConfig

            config = PreferenceHeadConfig()
        super().__init__(config=config, vocab_size=vocab_size)
        types = list(config.loss_types) or list(self.preset_types)
        if config.loss_weights:
            weights = list(config.loss_weights)
        elif config.loss_types and list(config.loss_types) != list(self.preset_types):
            weights = [1.0] * len(types)
        else:
            weights = list(self.preset_weights)
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"stage.head.preference.loss_types: unknown {unknown}; "
                             f"known: {list(LOSS_TYPES)}")
        if len(weights) != len(types):
            raise ValueError(f"stage.head.preference.loss_weights: {len(weights)} weight(s) for "
                             f"{len(types)} loss type(s) {types}")
        if config.beta <= 0:
            raise ValueError(f"stage.head.preference.beta: must be > 0, got {config.beta}")
        if not 0.0 <= config.label_smoothing < 0.5:
            raise ValueError("stage.head.preference.label_smoothing: must be in [0, 0.5), got "
                             f"{config.label_smoothing}")
        self.terms = dict(zip(types, weights, strict=True))
        self.beta = config.beta
        self.label_smoothing = config.label_smoothing
        self.uses_reference_model = config.reference == "model"
        self.reference_load = config.reference_load
        self.running = RunningMoments()
        self._pairs = self._chosen_tokens = None

    # ----------------------------------------------------------------- global statistics
    def batch_statistics(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        role = batch.get(PAIR_ROLE)
        if role is None:
            raise ValueError(f"{self.name} head: the batch has no {PAIR_ROLE!r} field")
        ids = batch.get(SAMPLE_IDS)
        chosen = role == CHOSEN
        if ids is None:
            pairs = int(chosen.any(dim=1).sum())
        else:
            # distinct (row, sample id) among chosen tokens
            keys = torch.arange(role.shape[0]).unsqueeze(1) * (int(ids.max()) + 1) + ids.long()
            pairs = int(torch.unique(keys[chosen]).numel())
        return {"pref/pairs": float(pairs),
                "pref/chosen_tokens": float(chosen_token_mask(batch).sum())}

    def begin_step(self, statistics: Mapping[str, float]) -> None:
        self._pairs = statistics["pref/pairs"]
        self._chosen_tokens = statistics["pref/chosen_tokens"]

    def end_step(self, reports: Mapping[str, tuple[float, float]], *, training: bool) -> None:
        if training and "bco_pair" in self.terms and "bco/reward" in reports:
            total, count = reports["bco/reward"]
            total_sq, _ = reports["bco/reward_sq"]
            self.running.update(total, total_sq, count)

    def state_dict(self) -> dict:
        return {"running": self.running.state_dict()} if "bco_pair" in self.terms else {}

    def load_state_dict(self, state: Mapping) -> None:
        if "running" in state:
            self.running.load_state_dict(state["running"])

    # ---------------------------------------------------------------------------- loss
    def __call__(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        if self._pairs is None:
            raise RuntimeError(f"{self.name} head: begin_step(global statistics) was not called "
                               "(the model step calls it before the micro-batch loop)")
        for name in (PAIR_ROLE, REF_LOGPROBS):
            if name not in batch:
                raise ValueError(f"{self.name} head: the batch has no {name!r} field"
                                 + (" (set stage.head.preference.reference: model, or precompute "
                                    "them with megatron-keye reference-logprobs)"
                                    if name == REF_LOGPROBS else ""))
        group = context_parallel_group()
        counted = counted_on_this_cp_rank()
        logp, _ = vocab_parallel_logprobs(output, batch[LABELS].transpose(0, 1),
                                          vocab_size=self.vocab_size, with_entropy=False)
        logp = logp.transpose(0, 1)  # [b, s]
        completion = supervised_mask(batch)
        sample_ids = batch.get(SAMPLE_IDS)
        pairs = find_pairs(batch[PAIR_ROLE], sample_ids, completion, group=group)
        slots = pairs.num_slots
        policy = sample_sums(logp * completion, sample_ids, num_slots=slots, group=group)
        with torch.no_grad():
            ref = sample_sums(batch[REF_LOGPROBS].float() * completion, sample_ids,
                              num_slots=slots, group=group)
        policy_c, policy_r = pairs.pick(policy)
        ref_c, ref_r = pairs.pick(ref)
        delta_c, delta_r = policy_c - ref_c, policy_r - ref_r
        reward_c, reward_r = self.beta * delta_c, self.beta * delta_r

        per_pair = delta_c.new_zeros(delta_c.shape)
        report: Report = {}
        n_pairs = torch.tensor(float(pairs.count if counted else 0))
        if "sigmoid" in self.terms:
            logits = reward_c - reward_r
            term = (-(1 - self.label_smoothing) * F.logsigmoid(logits)
                    - self.label_smoothing * F.logsigmoid(-logits))
            per_pair = per_pair + self.terms["sigmoid"] * term
            report["loss/sigmoid"] = report_entry(term.sum() * counted, n_pairs)
        if "ipo" in self.terms:
            len_c, len_r = pairs.pick(pairs.slot_tokens)
            h = delta_c / len_c.clamp(min=1) - delta_r / len_r.clamp(min=1)
            term = (h - 1.0 / (2.0 * self.beta)) ** 2
            per_pair = per_pair + self.terms["ipo"] * term
            report["loss/ipo"] = report_entry(term.sum() * counted, n_pairs)
        if "bco_pair" in self.terms:
            shift = self.running.mean
            term = -F.logsigmoid(reward_c - shift) - F.logsigmoid(-(reward_r - shift))
            per_pair = per_pair + self.terms["bco_pair"] * term
            report["loss/bco_pair"] = report_entry(term.sum() * counted, n_pairs)
            rewards = torch.cat([reward_c, reward_r]).detach()
            report["bco/reward"] = report_entry(rewards.sum() * counted, 2 * n_pairs)
            report["bco/reward_sq"] = report_entry((rewards ** 2).sum() * counted, 2 * n_pairs)
            report["bco/delta"] = report_entry(torch.tensor(shift * float(counted)),
                                               torch.tensor(float(counted)))
        # sequence-level terms count on one CP rank; the others keep the graph (zero weight) so
        # the CP sums' backward collectives still meet
        total = per_pair.sum() * (1.0 if counted else 0.0)
        if "sft" in self.terms:
            chosen = chosen_token_mask(batch)
            nll = -(logp * chosen).sum()
            tokens = chosen.sum()
            scale = self._pairs / self._chosen_tokens if self._chosen_tokens > 0 else 0.0
            total = total + self.terms["sft"] * scale * nll
            report["loss/sft"] = report_entry(nll, tokens)
        margins = (reward_c - reward_r).detach()
        report.update({
            "rewards/chosen": report_entry(reward_c.detach().sum() * counted, n_pairs),
            "rewards/rejected": report_entry(reward_r.detach().sum() * counted, n_pairs),
            "rewards/margins": report_entry(margins.sum() * counted, n_pairs),
            "rewards/accuracies": report_entry((margins > 0).float().sum() * counted, n_pairs),
            "logps/chosen": report_entry(policy_c.detach().sum() * counted, n_pairs),
            "logps/rejected": report_entry(policy_r.detach().sum() * counted, n_pairs),
        })
        count = torch.tensor(pairs.count if counted else 0, dtype=torch.int, device=total.device)
        return total, count, report


@register_loss_head("dpo")
class DirectPreferenceLoss(PreferenceLoss):
    """DPO; `stage.head.preference.loss_types` may pick ipo or bco_pair instead of sigmoid."""

    preset_types = ("sigmoid",)
    preset_weights = (1.0,)


@register_loss_head("mpo")
class MixedPreferenceLoss(PreferenceLoss):
    """MPO = 0.8 DPO-sigmoid + 0.2 BCO-pair + 1.0 SFT on the chosen (weights configurable)."""

    preset_types = ("sigmoid", "bco_pair", "sft")
    preset_weights = (0.8, 0.2, 1.0)
