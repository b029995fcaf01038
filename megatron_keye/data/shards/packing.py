"""Packing encoded samples into fixed-length rows: best fit, truncation, row tensors.

A *unit* is what must stay in one row: one sample, or the chosen and rejected samples of a
preference pair (consecutive, chosen first). Each sample of a packed row is padded to a multiple
of `pad_multiple` (2 x context-parallel size, so the zig-zag CP split cuts every sample evenly);
the rest of a row is one padding segment of its own. Rows are built by
`data/vision_batch.build_vision_batch` (labels shifted within each sample, M-RoPE ids restarting
per sample, vision inputs in placeholder order), so the shard loader and every other producer
share one row layout.

`BestFitPacker` keeps up to `max_open` rows open: a unit goes into the open row with the least
room that still fits it; when none fits and all rows are open, the fullest row is closed first.
A sample longer than a row is truncated (before any image or video that would not fit whole) or
dropped, as configured; the caller counts both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import torch

from megatron_keye.data import batch as contract
from megatron_keye.data.text.tokenizer import VisionTokenIds
from megatron_keye.data.vision_batch import VisionSample, build_vision_batch


@dataclass(frozen=True)
class PackUnit:
    """Samples that share a row, in order, with their pair roles (0 = not a pair)."""

    samples: tuple[VisionSample, ...]
    roles: tuple[int, ...]

    def length(self, pad_multiple: int) -> int:
        """Row slots the unit takes: each sample's tokens padded to `pad_multiple`."""
        return sum(padded_length(sample_length(s), pad_multiple) for s in self.samples)


def sample_length(sample: VisionSample) -> int:
    return int(torch.as_tensor(sample.tokens).numel())


def truncate_sample(sample: VisionSample, limit: int, ids: VisionTokenIds) -> VisionSample | None:
    """The sample's first tokens up to `limit`, cut before any image or video that would not
    fit whole (its pixels go too); None when nothing but a cut media block would remain."""
    tokens = torch.as_tensor(sample.tokens, dtype=torch.int64).flatten()
    if tokens.numel() <= limit:
        return sample
    starts = (tokens == ids.vision_start).nonzero().flatten().tolist()
    ends = (tokens == ids.vision_end).nonzero().flatten().tolist()
    cut, kept = limit, 0
    if len(starts) == len(ends) == len(sample.media):
        for start, end in zip(starts, ends, strict=True):
            if end < cut:
                kept += 1
            else:
                cut = min(cut, start)
                break
    elif starts:
        cut = min(cut, starts[0])
    if cut <= 0:
        return None
    mask = sample.target_mask
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.float32).flatten()[:cut]
    return replace(sample, tokens=tokens[:cut], target_mask=mask, media=tuple(sample.media[:kept]))


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


U = TypeVar("U")


@dataclass
class OpenRow(Generic[U]):
    units: list[U] = field(default_factory=list)
    used: int = 0


class BestFitPacker(Generic[U]):
    """Best-fit packing of units with known lengths into rows of `capacity` slots."""

    def __init__(self, *, capacity: int, max_open: int):
        if max_open < 1:
            raise ValueError(f"data.pack_open_rows must be at least 1, got {max_open}")
        self.capacity = capacity
        self.max_open = max_open
        self.rows: list[OpenRow[U]] = []

    def add(self, unit: U, length: int) -> list[list[U]]:
        """Place a unit (length <= capacity); returns the rows it closed (0, 1 or 2)."""
        if length > self.capacity:
            raise ValueError(f"a unit of {length} slots does not fit a row of {self.capacity}")
        best = None
        for row in self.rows:
            room = self.capacity - row.used
            if room >= length and (best is None or room < self.capacity - best.used):
                best = row
        closed = []
        if best is None:
            if len(self.rows) >= self.max_open:
                fullest = max(self.rows, key=lambda r: r.used)
                self.rows.remove(fullest)
                closed.append(fullest.units)
            best = OpenRow()
            self.rows.append(best)
        best.units.append(unit)
        best.used += length
        if best.used == self.capacity:
            self.rows.remove(best)
            closed.append(best.units)
        return closed

    def restore(self, rows: list[tuple[list[U], int]]) -> None:
        """Reopen rows (units, slots used) saved with `open_units`."""
        self.rows = [OpenRow(units=list(units), used=used) for units, used in rows]

    def open_units(self) -> list[list[U]]:
        return [list(row.units) for row in self.rows]




def build_row(units: Sequence[PackUnit], *, seq_length: int, pad_multiple: int,
              ids: VisionTokenIds, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row as a one-row micro-batch ([1, seq_length] fields, vision inputs in
    placeholder order). `sample_ids` is always set (a lone sample and its tail padding form one
    segment) and `pair_role` whenever the row holds a pair, so rows stack into micro-batches."""
    samples = [s for unit in units for s in unit.samples]
    roles = [r for unit in units for r in unit.roles]
    row = build_vision_batch([samples], seq_length=seq_length, ids=ids, pad_id=pad_id,
                             sample_multiple=pad_multiple)
    if contract.SAMPLE_IDS not in row:
        row[contract.SAMPLE_IDS] = torch.zeros_like(row[contract.TOKENS])
    if any(roles):
        role_of = torch.tensor([*roles, 0], dtype=torch.int64)  # the tail padding: no role
        row[contract.PAIR_ROLE] = role_of[row[contract.SAMPLE_IDS].clamp(max=len(roles))]
    return row


def concat_rows(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A micro-batch [b, s] from one-row batches; vision inputs concatenated in row order."""
    batch: dict[str, torch.Tensor] = {}
    for name in contract.TOKEN_FIELDS:
        present = [name in row for row in rows]
        if not any(present):
            continue
        if name == contract.PAIR_ROLE:
            parts = [row.get(name, torch.zeros_like(row[contract.TOKENS])) for row in rows]
        elif all(present):
            parts = [row[name] for row in rows]
        else:
            raise ValueError(f"packed rows disagree on field {name}")
        batch[name] = torch.cat(parts)
    batch[contract.POSITION_IDS] = torch.cat([row[contract.POSITION_IDS] for row in rows], dim=1)
    with_vision = [row for row in rows if contract.VISION_GRIDS in row]
    if with_vision:
        batch[contract.PIXEL_VALUES] = torch.cat([r[contract.PIXEL_VALUES] for r in with_vision])
        batch[contract.VISION_GRIDS] = torch.cat([r[contract.VISION_GRIDS] for r in with_vision])
    contract.check_batch(batch, where="packed micro-batch")
    return batch
