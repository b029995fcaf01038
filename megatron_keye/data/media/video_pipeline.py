"""A video from bytes to model inputs: decode, SlowFast classification, token budget, patch rows.

`load_video` is the equivalent of keye-vl-utils' `fetch_video` (same frames, frame types and
sizes); it classifies frames while the decoder thread is still producing later ones.
`video_pixel_values` is the processor step that resizes slow frames to the slow size and
fast frames to the fast size, normalizes them and cuts them into 14x14 patch rows, one frame after
the other, with a per-frame grid [1, h, w] in patch units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_keye.data.media.image import ImageConfig, normalize, patchify, resize_uint8
from megatron_keye.data.media.slowfast import SLOW, classify_slow_fast
from megatron_keye.data.media.video import DecodedVideo, open_video_stream
from megatron_keye.data.media.video_budget import VideoTokenBudget, solve_video_budget
from megatron_keye.data.media.video_config import VideoConfig
from megatron_keye.data.text.vision_tokens import TextEncoder, video_frame_token_ids


@dataclass(kw_only=True, frozen=True)
class VideoSample:
    """Sampled frames of one video with their SlowFast types and the chosen frame sizes."""

    decoded: DecodedVideo
    frame_types: torch.Tensor  # int32 [N]: 0 slow, 1 fast
    budget: VideoTokenBudget

    @property
    def frames(self) -> torch.Tensor:
        return self.decoded.frames

    @property
    def timestamps(self) -> torch.Tensor:
        return self.decoded.timestamps

    @property
    def num_frames(self) -> int:
        return int(self.frame_types.numel())

    @property
    def num_slow(self) -> int:
        return int((self.frame_types == SLOW).sum())

    @property
    def num_fast(self) -> int:
        return self.num_frames - self.num_slow

    def is_slow(self) -> list[bool]:
        """Per frame, whether it is a slow frame."""
        return (self.frame_types == SLOW).tolist()

    def frame_sizes(self) -> list[tuple[int, int]]:
        """(height, width) in pixels each frame is resized to for the vision tower."""
        slow = (self.budget.slow_height, self.budget.slow_width)
        fast = (self.budget.fast_height, self.budget.fast_width)
        return [slow if s else fast for s in self.is_slow()]

    def frame_grids(self, *, patch_size: int = 14) -> torch.Tensor:
        """Per-frame grids [[1, h, w], ...] in patch units (int64 [N, 3])."""
        rows = [[1, h // patch_size, w // patch_size] for h, w in self.frame_sizes()]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    @property
    def num_vision_tokens(self) -> int:
        """LLM tokens of all frames' pads (frame markers and timestamps not included)."""
        return self.budget.total_tokens(num_slow=self.num_slow, num_fast=self.num_fast)


def _with_budget(
    decoded: DecodedVideo, frame_types: torch.Tensor, config: VideoConfig
) -> VideoSample:
    num_slow = int((frame_types == SLOW).sum())
    budget = solve_video_budget(
        num_slow=num_slow,
        num_fast=frame_types.numel() - num_slow,
        height=decoded.height,
        width=decoded.width,
        config=config,
    )
    return VideoSample(decoded=decoded, frame_types=frame_types, budget=budget)


def load_video(
    source: str | os.PathLike | bytes,
    *,
    config: VideoConfig | None = None,
    key: str | None = None,
    start: float | None = None,
    end: float | None = None,
) -> VideoSample:
    """Decode, classify and budget one video (path or bytes); errors name `key` or the input.

    With single-threaded torch (data-loader workers) classification consumes frames as the
    decoder threads deliver them; the result is the same as classifying `decode_video`'s output.
    """
    config = config or VideoConfig()
    stream = open_video_stream(source, config=config, key=key, start=start, end=end)
    if torch.get_num_threads() > 1:
        # torch's OpenMP workers spin between ops and would take the cores from the decoder
        # threads (measured: slower than decoding first); overlap only single-threaded torch,
        # as in data-loader worker processes.
        stream.wait_for(stream.num_frames)
    frame_types = classify_slow_fast(stream, config=config)
    return _with_budget(stream.result(), frame_types, config)


def video_pixel_values(
    sample: VideoSample, *, image_config: ImageConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch rows of all frames in frame order and the per-frame grids.

    Slow frames are resized to the slow size and fast frames to the fast size (bilinear,
    antialiased, on uint8), normalized with the image mean/std and patchified in raster order.
    Returns (pixel_values float32 [sum_i h_i * w_i, 3, p, p], grids int64 [N, 3]).
    """
    image_config = image_config or ImageConfig()
    patch = image_config.patch_size
    slow_mask = sample.frame_types == SLOW
    budget = sample.budget
    rows_per_frame: list[torch.Tensor] = [torch.empty(0)] * sample.num_frames
    for mask, (height, width) in (
        (slow_mask, (budget.slow_height, budget.slow_width)),
        (~slow_mask, (budget.fast_height, budget.fast_width)),
    ):
        positions = mask.nonzero().flatten().tolist()
        if not positions:
            continue
        resized = resize_uint8(sample.frames[positions], height, width)
        pixels = normalize(resized, mean=image_config.image_mean, std=image_config.image_std)
        rows, (_, gh, gw) = patchify(pixels, patch_size=patch)
        for slot, position in enumerate(positions):
            rows_per_frame[position] = rows[slot * gh * gw : (slot + 1) * gh * gw]
    return torch.cat(rows_per_frame), sample.frame_grids(patch_size=patch)


def video_placeholder_tokens(sample: VideoSample, tokenizer: TextEncoder) -> list[int]:
    """The tokens that replace the video's single `<|video_pad|>` in a rendered conversation.

    Every frame in order: `<|frame|>` + its timestamp text + pads (fast frames wrapped in
    `<|fast_start|>` ... `<|fast_end|>`); see `vision_tokens.expand_vision_placeholders`.
    """
    return video_frame_token_ids(
        sample.frame_grids(),
        fast=[not slow for slow in sample.is_slow()],
        timestamps=sample.timestamps,
        tokenizer=tokenizer,
    )
