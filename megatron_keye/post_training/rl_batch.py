"""Rollouts → training micro-batches of the batch contract (`data/batch.py`) for the GSPO head.

A rollout is one sampled response to one prompt: the prompt's tokens, M-RoPE ids and media (the
generation `Prompt`), the response tokens with the sampling policy's log-probs (π_old) and the
sample's group advantage. `rollout_rows` packs rollouts into rows of `seq_length` tokens (in
order, a new row when the next one does not fit) with:
- `labels` shifted within each sample (label t = token t+1; the sample's last token and all
  padding -100), `loss_weights` 1 exactly on the labels that are response tokens;
- `old_logprobs` and `advantages` on those label positions (0 elsewhere);
- `position_ids`: the prompt's own ids, then the response continuing after the prompt's largest
  id on all three axes, as generation placed them, so a forward of the row reproduces the
  sampler's log-probs (the ratio starts at exactly 1);
- `sample_ids` when a row packs several samples (tail padding is its own sample);
- `pixel_values`/`vision_grids` of every prompt's media in row order.
`split_minibatches` cuts a rollout batch into the optimizer steps' global batches, each padded
with empty rows to a multiple of data-parallel size × micro-batch size, and `local_microbatches`
hands one data-parallel rank its micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_keye.data.batch import (
    ADVANTAGES,
    LABELS,
    LOSS_WEIGHTS,
    OLD_LOGPROBS,
    PIXEL_VALUES,
    POSITION_IDS,
    SAMPLE_IDS,
    TOKENS,
    VISION_GRIDS,
    check_batch,
)
from megatron_keye.data.vision_batch import IGNORE_INDEX, select_rows
from megatron_keye.post_training.generation import Prompt


@dataclass(kw_only=True)
class Rollout:
    """One sampled response, its reward and the group advantage it is trained with."""

    prompt: Prompt
    response: list[int]  # generated token ids (the stop token included)
    logprobs: list[float]  # the sampler's log p of each response token (π_old)
    prompt_index: int  # index of the prompt in the prompt file
    level: int = 0  # hint level of the prompt it answered
    source: str = "default"
    text: str = ""
    reward: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0

    @property
    def length(self) -> int:
        return self.prompt.tokens.numel() + len(self.response)


def _sample_tensors(rollout: Rollout):
    prompt = rollout.prompt
    p = prompt.tokens.numel()
    n = len(rollout.response)
    if len(rollout.logprobs) != n:
        raise ValueError(f"rollout of prompt {rollout.prompt_index}: {n} response tokens but "
                         f"{len(rollout.logprobs)} log-probs")
    tokens = torch.cat([prompt.tokens.long(), torch.tensor(rollout.response, dtype=torch.long)])
    length = p + n
    prompt_pos = prompt.positions().long()
    start = int(prompt_pos.max()) + 1
    response_pos = torch.arange(start, start + n, dtype=torch.long).view(1, n).expand(3, n)
    positions = torch.cat([prompt_pos, response_pos], dim=1)
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(length)
    old = torch.zeros(length)
    adv = torch.zeros(length)
    if n:
        # label position t predicts token t+1: response token j sits at p + j
        labels[p - 1 : length - 1] = tokens[p:]
        weights[p - 1 : length - 1] = 1.0
        old[p - 1 : length - 1] = torch.tensor(rollout.logprobs, dtype=torch.float32)
        adv[p - 1 : length - 1] = float(rollout.advantage)
    return tokens, labels, weights, old, adv, positions


def pack_rows(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Sample indices per row: in order, a new row when the next sample does not fit."""
    rows: list[list[int]] = []
    used = seq_length
    for i, n in enumerate(lengths):
        if n > seq_length:
            raise ValueError(f"rollout {i}: {n} tokens do not fit data.seq_length={seq_length}")
        if used + n > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def rollout_rows(rollouts: Sequence[Rollout], *, seq_length: int, pad_id: int,
                 num_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The packed global batch of `rollouts` (see the module docstring); `num_rows` pads it
    with empty rows (pad tokens, no loss) up to that many rows."""
    rows = pack_rows([r.length for r in rollouts], seq_length)
    count = max(len(rows), num_rows or 0)
    if num_rows is not None and len(rows) > num_rows:
        raise ValueError(f"rollouts need {len(rows)} rows, only {num_rows} allowed")
    packed = any(len(row) > 1 for row in rows)
    tokens = torch.full((count, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((count, seq_length), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((count, seq_length))
    old = torch.zeros((count, seq_length))
    adv = torch.zeros((count, seq_length))
    positions = torch.arange(seq_length).view(1, 1, -1).repeat(3, count, 1)
    sample_ids = torch.zeros((count, seq_length), dtype=torch.long)
    pixels, grids = [], []
    for r, row in enumerate(rows):
        cursor = 0
        for s, index in enumerate(row):
            rollout = rollouts[index]
            tok, lab, wei, o, a, pos = _sample_tensors(rollout)
            n = tok.numel()
            span = slice(cursor, cursor + n)
            tokens[r, span], labels[r, span], weights[r, span] = tok, lab, wei
            old[r, span], adv[r, span], positions[:, r, span] = o, a, pos
            sample_ids[r, span] = s
            cursor += n
            if rollout.prompt.vision_grids is not None and rollout.prompt.vision_grids.numel():
                pixels.append(rollout.prompt.pixel_values.float())
                grids.append(rollout.prompt.vision_grids.long().reshape(-1, 3))
        if cursor < seq_length:
            tail = 0 if packed else int(positions[:, r, :cursor].max()) + 1
            positions[:, r, cursor:] = torch.arange(tail, tail + seq_length - cursor)
            sample_ids[r, cursor:] = len(row)
    batch = {TOKENS: tokens, LABELS: labels, LOSS_WEIGHTS: weights, POSITION_IDS: positions,
             OLD_LOGPROBS: old, ADVANTAGES: adv}
    if packed:
        batch[SAMPLE_IDS] = sample_ids
    if grids:
        batch[PIXEL_VALUES] = torch.cat(pixels)
        batch[VISION_GRIDS] = torch.cat(grids)
    check_batch(batch, where="rollout batch")
    return batch


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """`items` in `parts` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        out.append(list(items[start : start + size]))
        start += size
    return out


def split_minibatches(rollouts: Sequence[Rollout], *, minibatches: int, seq_length: int,
                      pad_id: int, row_multiple: int) -> list[dict[str, torch.Tensor]]:
    """One global batch per optimizer step: the rollouts in `minibatches` contiguous chunks,
    each packed and padded to a multiple of `row_multiple` rows (DP size × micro-batch)."""
    out = []
    for chunk in split_evenly(rollouts, minibatches):
        if not chunk:
            raise ValueError(f"rl.minibatches={minibatches}: more minibatches than the "
                             f"{len(rollouts)} rollouts of the batch")
        rows = len(pack_rows([r.length for r in chunk], seq_length))
        rows = -(-rows // row_multiple) * row_multiple
        out.append(rollout_rows(chunk, seq_length=seq_length, pad_id=pad_id, num_rows=rows))
    return out


def local_microbatches(batch: dict[str, torch.Tensor], *, dp_rank: int, dp_size: int,
                       micro_batch: int, image_token_id: int,
                       video_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Data-parallel rank `dp_rank`'s contiguous share of the rows, in micro-batches."""
    rows = batch[TOKENS].size(0)
    if rows % (dp_size * micro_batch):
        raise ValueError(f"rollout batch: {rows} rows do not split into {dp_size} data ranks x "
                         f"micro-batches of {micro_batch}")
    share = rows // dp_size
    ids = dict(image_token_id=image_token_id, video_token_id=video_token_id)
    mine = select_rows(batch, dp_rank * share, (dp_rank + 1) * share, **ids)
    return [select_rows(mine, start, start + micro_batch, **ids)
            for start in range(0, share, micro_batch)]
