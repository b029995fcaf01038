"""Samples with images and videos → one micro-batch of the batch contract (`data/batch.py`).

A pure function any producer can call once its samples are tokenized (placeholders expanded by
`data/text/vision_tokens.py`) and its media turned into patch rows (`data/media/`):

    sample = VisionSample(tokens=ids, media=[VisionMedia.image(pixels, grid), ...], key="doc-7")
    batch = build_vision_batch([[sample_a], [sample_b, sample_c]], seq_length=256,
                               ids=tokenizer.vision, pad_id=tokenizer.pad_id)

Each inner list is one row; several samples in a row are packed (`sample_ids` marks them and
their M-RoPE ids restart at 0, as `mrope_position_ids` builds them per sample). The batch's
`pixel_values` and `vision_grids` list every image and every video frame in the order their
placeholder tokens appear (row by row, left to right), which is the order the model consumes
them in. Labels are shifted within each sample (its last token and all padding get -100), so a
context-parallel split or packing never pairs a token with another sample's target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_keye.data.batch import (
    LABELS,
    LOSS_WEIGHTS,
    PIXEL_VALUES,
    POSITION_IDS,
    SAMPLE_IDS,
    TOKENS,
    VISION_GRIDS,
)
from megatron_keye.data.text.tokenizer import VisionTokenIds
from megatron_keye.data.text.vision_tokens import MERGE_SIZE, mrope_position_ids, tokens_per_grid

IGNORE_INDEX = -100


@dataclass(kw_only=True, frozen=True)
class VisionMedia:
    """One image or one whole video of a sample: patch rows and one (1, h, w) grid per frame.

    `pixel_values` [sum of h*w, 3, p, p] holds the frames one after the other, each in raster
    order (what `preprocess_image` and `video_pixel_values` return).
    """

    kind: Literal["image", "video"]
    pixel_values: torch.Tensor
    grids: torch.Tensor  # int64 [frames, 3]; an image has one row

    @classmethod
    def image(cls, pixel_values: torch.Tensor, grid_thw: Sequence[int]) -> VisionMedia:
        """An image from its patch rows and (t, h, w) grid (t must be 1)."""
        return cls(kind="image", pixel_values=pixel_values,
                   grids=torch.as_tensor([list(grid_thw)], dtype=torch.int64))

    @classmethod
    def video(cls, pixel_values: torch.Tensor, frame_grids: torch.Tensor) -> VisionMedia:
        """A video from `video_pixel_values`' output: all frames' rows and per-frame grids."""
        return cls(kind="video", pixel_values=pixel_values,
                   grids=torch.as_tensor(frame_grids, dtype=torch.int64).reshape(-1, 3))


@dataclass(kw_only=True, frozen=True)
class VisionSample:
    """One tokenized sample and its media, in the order of their placeholders in `tokens`.

    `target_mask` (optional, one 0/1 or weight per token) says which tokens are trained to be
    predicted (e.g. the assistant's reply); by default every token except the image/video
    pads is a target. The weight of label i (the prediction of token i+1) is target_mask[i+1].
    """

    tokens: Sequence[int] | torch.Tensor
    media: Sequence[VisionMedia] = field(default_factory=tuple)
    target_mask: Sequence[float] | torch.Tensor | None = None
    key: str | None = None  # names the sample in errors


def _describe(sample: VisionSample, row: int, index: int) -> str:
    name = f"sample {sample.key!r}" if sample.key is not None else f"sample {index}"
    return f"{name} (row {row})"


def _check_media_order(tokens: torch.Tensor, sample: VisionSample, ids: VisionTokenIds,
                       merge_size: int, where: str) -> None:
    """Every frame's pads, in order, must be a block of the media's kind and grid size."""
    kinds = {ids.image_pad: "image", ids.video_pad: "video"}
    expected: list[tuple[str, int]] = []
    for media in sample.media:
        if media.kind not in ("image", "video"):
            raise ValueError(f"{where}: media kind {media.kind!r} is not 'image' or 'video'")
        patches = int(media.grids.prod(dim=1).sum())
        if media.pixel_values.shape[0] != patches:
            raise ValueError(f"{where}: a {media.kind} has {media.pixel_values.shape[0]} patch "
                             f"rows but its grids {media.grids.tolist()} describe {patches}")
        if media.kind == "image" and media.grids.shape[0] != 1:
            raise ValueError(f"{where}: an image needs exactly one grid, got {media.grids.tolist()}")
        for grid in media.grids.tolist():
            count = tokens_per_grid(grid, merge_size=merge_size, what=f"{where} {media.kind}")
            expected.extend([(media.kind, count)])
    pads = [(i, kinds[t]) for i, t in enumerate(tokens.tolist()) if t in kinds]
    cursor = 0
    for block, (kind, count) in enumerate(expected):
        chunk = pads[cursor : cursor + count]
        if len(chunk) < count:
            raise ValueError(f"{where}: {len(pads)} image/video pad tokens, but its media need "
                             f"{sum(c for _, c in expected)}")
        start = chunk[0][0]
        if any(k != kind for _, k in chunk) or chunk[-1][0] - start != count - 1:
            raise ValueError(f"{where}: vision block {block} ({kind}, {count} tokens) does not "
                             f"match the pads at token {start} (wrong kind or not contiguous)")
        cursor += count
    if cursor != len(pads):
        raise ValueError(f"{where}: {len(pads)} image/video pad tokens, but its media need "
                         f"{cursor}")


def _sample_fields(sample: VisionSample, ids: VisionTokenIds, merge_size: int, where: str):
    tokens = torch.as_tensor(sample.tokens, dtype=torch.int64).flatten()
    if tokens.numel() == 0:
        raise ValueError(f"{where}: no tokens")
    _check_media_order(tokens, sample, ids, merge_size, where)
    image_grids = [g for m in sample.media if m.kind == "image" for g in m.grids.tolist()]
    frame_grids = [g for m in sample.media if m.kind == "video" for g in m.grids.tolist()]
    try:
        positions = mrope_position_ids(tokens, image_grids=image_grids,
                                       video_frame_grids=frame_grids, ids=ids,
                                       merge_size=merge_size)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if sample.target_mask is None:
        targets = ((tokens != ids.image_pad) & (tokens != ids.video_pad)).float()
    else:
        targets = torch.as_tensor(sample.target_mask, dtype=torch.float32).flatten()
        if targets.numel() != tokens.numel():
            raise ValueError(f"{where}: target_mask has {targets.numel()} entries for "
                             f"{tokens.numel()} tokens")
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:-1] = tokens[1:]
    weights = torch.zeros_like(targets)
    weights[:-1] = targets[1:]
    labels[weights == 0] = IGNORE_INDEX
    return tokens, labels, weights, positions


def build_vision_batch(
    rows: Sequence[Sequence[VisionSample]],
    *,
    seq_length: int,
    ids: VisionTokenIds,
    pad_id: int,
    sample_multiple: int = 1,
    merge_size: int = MERGE_SIZE,
) -> dict[str, torch.Tensor]:
    """The micro-batch of `rows` (each a list of samples packed into one row of `seq_length`).

    With `sample_multiple` > 1 (2 x context-parallel degree) every sample of a packed row is
    padded to a multiple of it, as the CP split needs. Padding tokens are `pad_id` with label
    -100 and weight 0; in a packed row the tail padding is its own sample. `sample_ids` is set
    when any row holds more than one sample. A sample that does not fit, or whose placeholders
    disagree with its media, is a ValueError naming it.
    """
    if not rows:
        raise ValueError("build_vision_batch: no rows")
    packed = any(len(row) > 1 for row in rows)
    count = len(rows)
    tokens = torch.full((count, seq_length), pad_id, dtype=torch.int64)
    labels = torch.full((count, seq_length), IGNORE_INDEX, dtype=torch.int64)
    weights = torch.zeros((count, seq_length), dtype=torch.float32)
    positions = torch.zeros((3, count, seq_length), dtype=torch.int64)
    sample_ids = torch.zeros((count, seq_length), dtype=torch.int64)
    pixel_values: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    index = 0
    for r, row in enumerate(rows):
        if not row:
            raise ValueError(f"build_vision_batch: row {r} has no samples")
        cursor = tail = 0
        for s, sample in enumerate(row):
            where = _describe(sample, r, index)
            index += 1
            tok, lab, wei, pos = _sample_fields(sample, ids, merge_size, where)
            length = tok.numel()
            span = -(-length // sample_multiple) * sample_multiple if packed else length
            if cursor + span > seq_length:
                raise ValueError(f"{where}: {length} tokens do not fit in the "
                                 f"{seq_length - cursor} left of a {seq_length}-token row")
            tokens[r, cursor : cursor + length] = tok
            labels[r, cursor : cursor + length] = lab
            weights[r, cursor : cursor + length] = wei
            positions[:, r, cursor : cursor + length] = pos
            # Padding inside a packed sample continues its text positions.
            tail = int(pos.max()) + 1
            positions[:, r, cursor + length : cursor + span] = torch.arange(
                tail, tail + span - length)
            sample_ids[r, cursor : cursor + span] = s
            cursor += span
            for media in sample.media:
                pixel_values.append(media.pixel_values.to(torch.float32))
                grids.append(media.grids)
        if cursor < seq_length:
            # Row padding: its own sample in a packed row, else the sample's continuation.
            start = 0 if packed else tail
            positions[:, r, cursor:] = torch.arange(start, start + seq_length - cursor)
            sample_ids[r, cursor:] = len(row)
    batch = {TOKENS: tokens, LABELS: labels, LOSS_WEIGHTS: weights, POSITION_IDS: positions}
    if packed:
        batch[SAMPLE_IDS] = sample_ids
    if grids:
        batch[PIXEL_VALUES] = torch.cat(pixel_values)
        batch[VISION_GRIDS] = torch.cat(grids).to(torch.int64)
    return batch


def one_per_row(samples: Sequence[VisionSample]) -> list[list[VisionSample]]:
    """`rows` for `build_vision_batch` with every sample in a row of its own."""
    return [[sample] for sample in samples]


def select_rows(batch: dict[str, torch.Tensor], start: int, stop: int, *, image_token_id: int,
                video_token_id: int, merge_size: int = MERGE_SIZE) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a batch with just their images and frames (data-parallel shares,
    micro-batches). A vision item belongs to the row holding its pads: items are taken in
    order, each row consuming as many as its pad count covers (rows must hold whole items)."""
    out = {}
    for key, value in batch.items():
        if key in (PIXEL_VALUES, VISION_GRIDS):
            continue
        out[key] = value[:, start:stop] if key == POSITION_IDS else value[start:stop]
    if VISION_GRIDS not in batch:
        return out
    grids = batch[VISION_GRIDS]
    pads = ((batch[TOKENS] == image_token_id) | (batch[TOKENS] == video_token_id)).sum(dim=1)
    tokens = (grids.prod(dim=1) // (merge_size * merge_size)).tolist()
    patches = grids.prod(dim=1).tolist()
    bounds = [0]  # first item of each row
    item = 0
    for row, count in enumerate(pads.tolist()):
        left = count
        while left > 0 and item < len(tokens):
            left -= tokens[item]
            item += 1
        if left != 0:
            raise ValueError(f"batch row {row}: its {count} image/video pads do not cover whole "
                             f"vision items of vision_grids")
        bounds.append(item)
    if item != len(tokens):
        raise ValueError(f"batch: vision items from item {item} on have no image/video pads")
    first, last = bounds[start], bounds[stop]
    if first < last:
        patch_start = sum(patches[:first])
        patch_stop = patch_start + sum(patches[first:last])
        out[PIXEL_VALUES] = batch[PIXEL_VALUES][patch_start:patch_stop]
        out[VISION_GRIDS] = grids[first:last]
    return out
