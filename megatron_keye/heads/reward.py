"""Reward model: a Bradley-Terry loss on the value head's score of each sample's last token.

The model (`model.output_head: value`) returns one fp32 score per token [s, b]. A sample's
reward r is the score at its last real token (the last token whose id is not
`stage.head.reward.pad_token_id`, as transformers' sequence classification reads it). Pairs are
consecutive samples of a row, chosen then rejected, marked by `pair_role`; with packed rows
(`sample_ids`) several pairs share a row, and under context parallelism a sample's last token
lives on one CP rank: its score is picked with a one-hot of the last position and summed over
the CP group (`heads/sequence.py`), so every rank sees every r and gradients reach the rank
holding the token. Per pair (TRL's RewardTrainer, posttrain-data.md A4):

    loss = -log σ(r_c - r_r - m) + η (r_c + r_r)²

with m = `margin` + the pair's `pair_margin` (batch field, optional) and η =
`center_coefficient`. The head returns the sum over pairs and the pair count (counted on CP
rank 0), so the trainer's step loss is the mean over the global batch's pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_keye.data.batch import PAIR_MARGIN, PAIR_ROLE, POSITIONS, SAMPLE_IDS, TOKENS
from megatron_keye.heads.base import HeadBase, HeadNeeds, Report, register_loss_head, report_entry
from megatron_keye.heads.sequence import (
    context_parallel_group,
    counted_on_this_cp_rank,
    find_pairs,
    sample_sums,
)
from megatron_keye.ops.collectives import all_reduce_values


@dataclass
class PairRewards:
    """Rewards of the pairs of one (CP-local) micro-batch, in row-major pair order."""

    chosen: torch.Tensor  # [pairs] r(x, y_c), differentiable
    rejected: torch.Tensor  # [pairs] r(x, y_r)
    margin: torch.Tensor  # [pairs] data margin (0 without `pair_margin`), no grad


def last_token_mask(batch: Mapping[str, torch.Tensor], *, num_slots: int,
                    pad_token_id: int | None, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[b, s] bool: the last real token of each sample, over the whole (CP-split) row.

    Position order comes from `positions` (each token's place in its full row, set under CP)
    or the token index; the maximum per sample is taken over the CP group.
    """
    tokens = batch[TOKENS]
    rows, seq = tokens.shape
    positions = batch.get(POSITIONS)
    if positions is None:
        positions = torch.arange(seq, device=tokens.device).expand(rows, seq)
    positions = positions.long()
    real = tokens != pad_token_id if pad_token_id is not None else torch.ones_like(tokens, dtype=torch.bool)
    ids = batch.get(SAMPLE_IDS)
    ids = torch.zeros_like(tokens) if ids is None else ids.long()
    key = torch.where(real, positions, torch.full_like(positions, -1))
    last = key.new_full((rows, num_slots), -1).scatter_reduce(1, ids, key, "amax")
    if group is not None:
        last = all_reduce_values(last, op=dist.ReduceOp.MAX, group=group,
                                 dtype=torch.int64).to(tokens.device)
    return real & (positions == last.gather(1, ids))


def pair_rewards(scores: torch.Tensor, batch: Mapping[str, torch.Tensor], *,
                 pad_token_id: int | None) -> PairRewards:
    """r_c, r_r (and data margins) of every pair in a micro-batch.

    `scores` [s, b] are the value head's per-token scores (this rank's CP share). Raises naming
    the row and sample when a paired sample has no real token.
    """
    if PAIR_ROLE not in batch:
        raise ValueError(f"reward head: the batch has no {PAIR_ROLE!r} field (reward pairs)")
    group = context_parallel_group()
    per_token = scores.float().transpose(0, 1)  # [b, s]
    tokens = batch[TOKENS]
    real = (tokens != pad_token_id if pad_token_id is not None
            else torch.ones_like(tokens, dtype=torch.bool)).float()
    sample_ids = batch.get(SAMPLE_IDS)
    pairs = find_pairs(batch[PAIR_ROLE], sample_ids, real, group=group)
    for side in pairs.pick(pairs.slot_tokens):
        if bool((side <= 0).any()):
            bad = int((side <= 0).nonzero()[0])
            raise ValueError(f"reward head: a sample of pair {bad} (row {int(pairs.rows[bad])}) "
                             f"has no token other than padding")
    last = last_token_mask(batch, num_slots=pairs.num_slots, pad_token_id=pad_token_id,
                           group=group).float()
    per_sample = sample_sums(per_token * last, sample_ids, num_slots=pairs.num_slots, group=group)
    chosen, rejected = pairs.pick(per_sample)
    if PAIR_MARGIN in batch:
        with torch.no_grad():
            margins = sample_sums(batch[PAIR_MARGIN].float() * last, sample_ids,
                                  num_slots=pairs.num_slots, group=group)
        margin = pairs.pick(margins)[0]
    else:
        margin = torch.zeros_like(chosen).detach()
    return PairRewards(chosen=chosen, rejected=rejected, margin=margin)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float,
                       *, center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair loss -log σ(r_c - r_r - m) + η (r_c + r_r)²."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


@register_loss_head("reward")
class RewardModelLoss(HeadBase):
    """Bradley-Terry pairs on a value model's last-token scores (`stage.head.reward`)."""

    needs = HeadNeeds(output="scores", sample_ids=True, pair_roles=True)
    config_section = "reward"

    def __call__(
        self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        if output.dim() != 2:
            raise ValueError(f"reward head: expected per-token scores [s, b] from a value model "
                             f"(model.output_head=value), got shape {tuple(output.shape)}")
        config = self.config
        rewards = pair_rewards(output, batch, pad_token_id=config.pad_token_id)
        losses = bradley_terry_loss(rewards.chosen, rewards.rejected,
                                    rewards.margin + config.margin,
                                    center_coefficient=config.center_coefficient)
        counted = counted_on_this_cp_rank()
        total = losses.sum() if counted else losses.sum() * 0.0
        pairs = rewards.chosen.numel() if counted else 0
        count = torch.tensor(pairs, dtype=torch.int, device=output.device)
        with torch.no_grad():
            scale = 1.0 if counted else 0.0
            correct = (rewards.chosen > rewards.rejected).float().sum() * scale
            report = {
                "rm loss": report_entry(total, count),
                "rm accuracy": report_entry(correct, count),
                "rm margin": report_entry((rewards.chosen - rewards.rejected).sum() * scale, count),
                "rm chosen": report_entry(rewards.chosen.sum() * scale, count),
                "rm rejected": report_entry(rewards.rejected.sum() * scale, count),
            }
        return total, count, report


__all__ = ["PairRewards", "RewardModelLoss", "bradley_terry_loss", "last_token_mask",
           "pair_rewards"]
