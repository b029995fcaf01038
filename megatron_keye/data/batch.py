"""The micro-batch contract: the one shape every producer yields and every consumer reads.

Producers (the synthetic corpus, the shard loader, preference pairs, rollouts) build a plain
`dict[str, torch.Tensor]` with these fields; consumers (the model step, the CP split, the vision
model, the loss heads) read only them. A new data source or head adds a field here, never a new
path through the trainer. `check_batch` is the gate producers and tests use to catch a malformed
batch early, with the field named.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# --- per-token fields, [b, s]; the CP split cuts these zig-zag -------------------------------
TOKENS = "tokens"  # int64 input ids, vision placeholders already expanded
LABELS = "labels"  # int64 next-token targets, shifted on the full row before any split; -100 = ignore
LOSS_WEIGHTS = "loss_weights"  # float: 0/1 masks, or per-token weights (SFT sample/square averaging)
SAMPLE_IDS = "sample_ids"  # int64, optional: packed-sample index within the row (0, 0, 1, 1, 1, ...)
# Preference and reward pairs: a pair is two consecutive samples of one row, chosen then rejected;
# every token of a sample carries its role (0 = not part of a pair, e.g. row padding).
PAIR_ROLE = "pair_role"  # int64, optional: 1 = chosen, 2 = rejected
REF_LOGPROBS = "ref_logprobs"  # float32, optional: reference model's log p(label) per token
# Reward pairs: the pair's Bradley-Terry margin on every token of its chosen sample (0 elsewhere).
PAIR_MARGIN = "pair_margin"  # float32, optional
# RL rollouts (GSPO/GRPO): the sampling policy's log p(label) per token (pi_old), and each token's
# advantage (a sample's group-normalized advantage repeated over its response tokens).
OLD_LOGPROBS = "old_logprobs"  # float32, optional
ADVANTAGES = "advantages"  # float32, optional
TOKEN_FIELDS = (TOKENS, LABELS, LOSS_WEIGHTS, SAMPLE_IDS, PAIR_ROLE, REF_LOGPROBS, OLD_LOGPROBS,
                ADVANTAGES, PAIR_MARGIN)
CHOSEN, REJECTED = 1, 2

# --- [3, b, s] M-RoPE (t, h, w) ids; text tokens carry three equal rows ------------------------
POSITION_IDS = "position_ids"
POSITION_FIELDS = (POSITION_IDS,)

# --- added by the model step under CP: [b, s/CP] index of each kept token in its full row -----
POSITIONS = "positions"

# --- vision, consumed on the first pipeline stage --------------------------------------------
# Patch rows [patches, 3, 14, 14] (normalized pixels), every image and video frame in the order
# their placeholder tokens appear in the batch (row by row, left to right).
PIXEL_VALUES = "pixel_values"
# int64 [items, 3]: one (t=1, h, w) grid per image and per video frame, in patch units, same order.
VISION_GRIDS = "vision_grids"
VISION_FIELDS = (PIXEL_VALUES, VISION_GRIDS)

# --- further head extras (advantages, old log-probs, ...) are per-token [b, s] fields added to
# TOKEN_FIELDS here, so the CP split cuts them with the tokens; sequence-level quantities are
# reduced over `sample_ids` by the heads.

REQUIRED = (TOKENS, LABELS, LOSS_WEIGHTS, POSITION_IDS)


def check_batch(batch: Mapping[str, torch.Tensor], *, where: str = "batch") -> None:
    """Raise a ValueError naming the field when `batch` breaks the contract."""
    missing = [name for name in REQUIRED if name not in batch]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; has {sorted(batch)}")
    shape = tuple(batch[TOKENS].shape)
    if len(shape) != 2:
        raise ValueError(f"{where}: {TOKENS} must be [b, s], got {shape}")
    for name in TOKEN_FIELDS:
        if name in batch and tuple(batch[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(batch[name].shape)}, "
                             f"{TOKENS} has {shape}")
    if tuple(batch[POSITION_IDS].shape) != (3, *shape):
        raise ValueError(f"{where}: {POSITION_IDS} must be [3, b, s] = {(3, *shape)}, "
                         f"got {tuple(batch[POSITION_IDS].shape)}")
    has_pixels, has_grids = PIXEL_VALUES in batch, VISION_GRIDS in batch
    if has_pixels != has_grids:
        raise ValueError(f"{where}: {PIXEL_VALUES} and {VISION_GRIDS} come together")
    if has_grids:
        grids = batch[VISION_GRIDS]
        if grids.dim() != 2 or grids.shape[1] != 3:
            raise ValueError(f"{where}: {VISION_GRIDS} must be [items, 3], got {tuple(grids.shape)}")
        patches = int(grids.prod(dim=1).sum())
        if batch[PIXEL_VALUES].shape[0] != patches:
            raise ValueError(f"{where}: {PIXEL_VALUES} has {batch[PIXEL_VALUES].shape[0]} patch rows, "
                             f"{VISION_GRIDS} describe {patches}")
