"""Vision tokens in the text, the grids the model reads with them, and 3D M-RoPE position ids.

Layout (spec §1.4; grids in 14-pixel patch units, one LLM token per 2x2 patches):
- image: `<|vision_start|>` `<|image_pad|>` x (h * w / 4) `<|vision_end|>`
- video: `<|vision_start|>`, then per frame in order
    slow: `<|frame|>` + text of format(ts, ".1f") + `<|video_pad|>` x (h * w / 4)
    fast: `<|frame|>` + text of format(ts, ".1f") + `<|fast_start|>` + pads + `<|fast_end|>`
  then `<|vision_end|>`; the timestamp text is left out when a video has no timestamps.
Videos carry one grid row [1, h, w] per frame; `merge_thw` gives the processor's compact form
(adjacent equal rows merged, e.g. [[1, 34, 46], [59, 18, 24]]) and `split_thw` undoes it.

Position ids (spec §1.5): text tokens advance t, h and w together; each image and each video frame
is a block at (0, row, column) + next, after which next = block max + 1 = next + max(h', w').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from megatron_keye.data.text.tokenizer import VisionTokenIds

MERGE_SIZE = 2


class TextEncoder(Protocol):
    """What the layout needs from a tokenizer (KeyeTokenizer satisfies it)."""

    vision: VisionTokenIds

    def encode(self, text: str) -> list[int]: ...


def _grid_rows(grids: torch.Tensor | Sequence[Sequence[int]], what: str) -> torch.Tensor:
    rows = torch.as_tensor(grids, dtype=torch.int64)
    if rows.numel() == 0:
        return rows.reshape(0, 3)
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    if rows.dim() != 2 or rows.shape[1] != 3:
        raise ValueError(f"{what}: grids must be rows of (t, h, w), got shape {tuple(rows.shape)}")
    if (rows <= 0).any():
        raise ValueError(f"{what}: grid entries must be positive, got {rows.tolist()}")
    return rows


def tokens_per_grid(
    grid: Sequence[int], *, merge_size: int = MERGE_SIZE, what: str = "grid"
) -> int:
    """LLM tokens of a (t, h, w) patch grid: t * (h / merge) * (w / merge)."""
    t, h, w = (int(x) for x in grid)
    if h % merge_size or w % merge_size:
        raise ValueError(f"{what}: grid {[t, h, w]} is not divisible by merge size {merge_size}")
    return t * (h // merge_size) * (w // merge_size)


def merge_thw(grids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-frame rows [[1, h, w], ...] -> adjacent equal (h, w) rows merged, t summed."""
    rows = _grid_rows(grids, "merge_thw")
    merged: list[list[int]] = []
    for t, h, w in rows.tolist():
        if merged and merged[-1][1] == h and merged[-1][2] == w:
            merged[-1][0] += t
        else:
            merged.append([t, h, w])
    return torch.tensor(merged, dtype=torch.int64).reshape(-1, 3)


def split_thw(grids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """Merged rows [[t, h, w], ...] -> one [1, h, w] row per frame."""
    rows = _grid_rows(grids, "split_thw")
    if rows.numel() == 0:
        return rows
    repeats = rows[:, 0]
    frames = rows.repeat_interleave(repeats, dim=0)
    frames[:, 0] = 1
    return frames


def image_token_ids(
    grid_thw: Sequence[int], *, ids: VisionTokenIds, merge_size: int = MERGE_SIZE
) -> list[int]:
    """`<|vision_start|>` + `<|image_pad|>` x tokens + `<|vision_end|>` for one image grid."""
    count = tokens_per_grid(grid_thw, merge_size=merge_size, what="image")
    return [ids.vision_start, *([ids.image_pad] * count), ids.vision_end]


def video_frame_token_ids(
    frame_grids: torch.Tensor | Sequence[Sequence[int]],
    *,
    fast: Sequence[bool],
    timestamps: Sequence[float] | torch.Tensor | None,
    tokenizer: TextEncoder,
    merge_size: int = MERGE_SIZE,
) -> list[int]:
    """The tokens that replace a video's single `<|video_pad|>`: every frame, in order."""
    rows = _grid_rows(frame_grids, "video")
    if len(fast) != rows.shape[0]:
        raise ValueError(f"video: {rows.shape[0]} frame grids but {len(fast)} frame types")
    if timestamps is not None and len(timestamps) != rows.shape[0]:
        raise ValueError(f"video: {rows.shape[0]} frame grids but {len(timestamps)} timestamps")
    if isinstance(timestamps, torch.Tensor):
        timestamps = timestamps.tolist()
    ids = tokenizer.vision
    out: list[int] = []
    for index, (row, is_fast) in enumerate(zip(rows.tolist(), fast, strict=True)):
        count = tokens_per_grid(row, merge_size=merge_size, what=f"video frame {index}")
        out.append(ids.frame)
        if timestamps is not None:
            out.extend(tokenizer.encode(format(float(timestamps[index]), ".1f")))
        pads = [ids.video_pad] * count
        out.extend([ids.fast_start, *pads, ids.fast_end] if is_fast else pads)
    return out


def video_token_ids(
    frame_grids: torch.Tensor | Sequence[Sequence[int]],
    *,
    fast: Sequence[bool],
    timestamps: Sequence[float] | torch.Tensor | None,
    tokenizer: TextEncoder,
    merge_size: int = MERGE_SIZE,
) -> list[int]:
    """A whole video: `<|vision_start|>` + every frame's tokens + `<|vision_end|>`."""
    body = video_frame_token_ids(
        frame_grids, fast=fast, timestamps=timestamps, tokenizer=tokenizer, merge_size=merge_size
    )
    return [tokenizer.vision.vision_start, *body, tokenizer.vision.vision_end]


def expand_vision_placeholders(
    token_ids: Sequence[int],
    *,
    image_grids: Sequence[Sequence[int]] = (),
    video_frames: Sequence[list[int]] = (),
    ids: VisionTokenIds,
    merge_size: int = MERGE_SIZE,
) -> list[int]:
    """Replace each single image/video pad of a rendered template, in order.

    The i-th `<|image_pad|>` becomes the pads of `image_grids[i]`; the j-th `<|video_pad|>`
    becomes `video_frames[j]` (from `video_frame_token_ids`). Counts must match exactly.
    """
    out: list[int] = []
    image_index = video_index = 0
    for token in token_ids:
        if token == ids.image_pad:
            if image_index >= len(image_grids):
                raise ValueError(
                    f"text has more image placeholders than the {len(image_grids)} images"
                )
            count = tokens_per_grid(image_grids[image_index], merge_size=merge_size, what="image")
            out.extend([ids.image_pad] * count)
            image_index += 1
        elif token == ids.video_pad:
            if video_index >= len(video_frames):
                raise ValueError(
                    f"text has more video placeholders than the {len(video_frames)} videos"
                )
            out.extend(video_frames[video_index])
            video_index += 1
        else:
            out.append(token)
    if image_index != len(image_grids) or video_index != len(video_frames):
        raise ValueError(
            f"text has {image_index} image and {video_index} video placeholders for "
            f"{len(image_grids)} images and {len(video_frames)} videos"
        )
    return out


def mrope_position_ids(
    token_ids: Sequence[int] | torch.Tensor,
    *,
    image_grids: torch.Tensor | Sequence[Sequence[int]] = (),
    video_frame_grids: torch.Tensor | Sequence[Sequence[int]] = (),
    ids: VisionTokenIds,
    merge_size: int = MERGE_SIZE,
) -> torch.Tensor:
    """3D (t, h, w) position ids [3, L] of one sample.

    `image_grids` has one (1, h, w) row per image and `video_frame_grids` one (1, h, w) row per
    video frame (all videos' frames in order, e.g. `split_thw` of the merged grids), both in
    patch units. Pads must come in blocks of exactly each grid's token count.
    """
    tokens = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
    length = tokens.numel()
    grids = {
        ids.image_pad: _grid_rows(image_grids, "image").tolist(),
        ids.video_pad: _grid_rows(video_frame_grids, "video").tolist(),
    }
    used = {ids.image_pad: 0, ids.video_pad: 0}
    kind_name = {ids.image_pad: "image", ids.video_pad: "video frame"}
    positions = torch.empty((3, length), dtype=torch.int64)
    pad_positions = ((tokens == ids.image_pad) | (tokens == ids.video_pad)).nonzero().flatten()
    pad_list = pad_positions.tolist()
    next_position = 0
    cursor = 0
    pointer = 0
    while pointer < len(pad_list):
        start = pad_list[pointer]
        run = start - cursor
        positions[:, cursor:start] = torch.arange(next_position, next_position + run)
        next_position += run
        kind = int(tokens[start])
        index = used[kind]
        if index >= len(grids[kind]):
            raise ValueError(
                f"token {start}: more {kind_name[kind]} pads than the "
                f"{len(grids[kind])} grids given"
            )
        t, h, w = grids[kind][index]
        used[kind] += 1
        if t != 1:
            raise ValueError(
                f"{kind_name[kind]} {index}: grid {[t, h, w]} must have t = 1 per block"
            )
        count = tokens_per_grid((t, h, w), merge_size=merge_size, what=f"{kind_name[kind]} {index}")
        block = tokens[start : start + count]
        if block.numel() != count or not bool((block == kind).all()):
            raise ValueError(
                f"{kind_name[kind]} {index}: expected {count} consecutive pads at token {start}"
            )
        rows, cols = h // merge_size, w // merge_size
        positions[0, start : start + count] = next_position
        positions[1, start : start + count] = next_position + torch.arange(rows).repeat_interleave(
            cols
        )
        positions[2, start : start + count] = next_position + torch.arange(cols).repeat(rows)
        next_position += max(rows, cols)
        cursor = start + count
        pointer += count
    positions[:, cursor:] = torch.arange(next_position, next_position + (length - cursor))
    for kind, rows_given in grids.items():
        if used[kind] != len(rows_given):
            raise ValueError(
                f"{len(rows_given)} {kind_name[kind]} grids given but the tokens hold {used[kind]}"
            )
    return positions
