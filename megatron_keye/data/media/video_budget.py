"""The SlowFast token budget: frame sizes of slow and fast frames for a whole video.

Reference (keye-vl-utils 1.5.2 `fetch_video`), with S slow and F fast frames of size H x W:

    min_pixels = max(config.min_pixels, 48 * 784);  min_tokens = int(min_pixels / 784)
    lo, hi = min_pixels / 784, config.max_pixels / 784            # 48.0, 768.0 (floats)
    estimate(t) = (S * t + F * max(int(0.3 * t), min_tokens)) * 784
    while lo < hi:
        mid = int(lo + hi) // 2
        if estimate(mid) > total_pixels: hi = mid
        else: lo = mid + 1
    slow (h, w) = smart_resize(H, W, 28, min_pixels, lo * 784)
    fast (h, w) = smart_resize(H, W, 28, min_pixels, max(int(h * w / 784 * 0.3) * 784, 48 * 784))

The search ends on the first t whose estimate exceeds the budget (768 if none does), not the last
one that fits, so a video can get one token per slow frame more than the budget allows; this is
reproduced on purpose (it is what the released model was trained with). Text tokens of the frames
(timestamps, markers) are outside the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_keye.data.media.image import smart_resize
from megatron_keye.data.media.video_config import VIDEO_MIN_PIXELS_FLOOR, VideoConfig


@dataclass(kw_only=True, frozen=True)
class VideoTokenBudget:
    """Frame sizes (pixels, multiples of the factor) chosen for one video, and the search result."""

    slow_height: int
    slow_width: int
    fast_height: int
    fast_width: int
    token_limit: float  # `lo`: the slow-frame token cap the search ended on (int unless the
    # search never moved it from a fractional min_pixels / 784)
    factor: int = 28

    @property
    def slow_tokens(self) -> int:
        """LLM tokens of one slow frame (one per 28x28 block)."""
        return (self.slow_height // self.factor) * (self.slow_width // self.factor)

    @property
    def fast_tokens(self) -> int:
        """LLM tokens of one fast frame."""
        return (self.fast_height // self.factor) * (self.fast_width // self.factor)

    def total_tokens(self, *, num_slow: int, num_fast: int) -> int:
        """Vision tokens of the whole video (frame text not included)."""
        return num_slow * self.slow_tokens + num_fast * self.fast_tokens


def search_slow_token_limit(*, num_slow: int, num_fast: int, config: VideoConfig) -> int | float:
    """The binary search of the reference: the first slow-frame token count over the budget.

    Returned as the reference leaves it (an int, or the float min_pixels / 784 when the search
    never raised it), because slow frames are then capped at exactly this value times 784 pixels.
    """
    token_pixels = config.factor * config.factor
    min_pixels = max(int(config.min_pixels), VIDEO_MIN_PIXELS_FLOOR)
    min_tokens = int(min_pixels / token_pixels)
    low: float = min_pixels / token_pixels
    high: float = config.max_pixels / token_pixels

    def estimate_pixels(tokens_per_frame: int) -> int:
        fast_tokens = max(int(config.fast_token_ratio * tokens_per_frame), min_tokens)
        return num_slow * tokens_per_frame * token_pixels + num_fast * fast_tokens * token_pixels

    while low < high:
        middle = int(low + high) // 2
        if estimate_pixels(middle) > config.total_pixels:
            high = middle
        else:
            low = middle + 1
    return low


def solve_video_budget(
    *, num_slow: int, num_fast: int, height: int, width: int, config: VideoConfig | None = None
) -> VideoTokenBudget:
    """Slow and fast frame sizes for a video of `height` x `width` frames (reference arithmetic)."""
    config = config or VideoConfig()
    if num_slow < 0 or num_fast < 0 or num_slow + num_fast == 0:
        raise ValueError(
            f"solve_video_budget: need at least one frame, got num_slow={num_slow}, "
            f"num_fast={num_fast}"
        )
    token_pixels = config.factor * config.factor
    min_pixels = max(int(config.min_pixels), VIDEO_MIN_PIXELS_FLOOR)
    limit = search_slow_token_limit(num_slow=num_slow, num_fast=num_fast, config=config)
    slow_h, slow_w = smart_resize(
        height, width, factor=config.factor, min_pixels=min_pixels, max_pixels=limit * token_pixels
    )
    slow_tokens = slow_h * slow_w / token_pixels
    fast_max_pixels = max(
        int(slow_tokens * config.fast_token_ratio) * token_pixels, VIDEO_MIN_PIXELS_FLOOR
    )
    fast_h, fast_w = smart_resize(
        height, width, factor=config.factor, min_pixels=min_pixels, max_pixels=fast_max_pixels
    )
    return VideoTokenBudget(
        slow_height=slow_h,
        slow_width=slow_w,
        fast_height=fast_h,
        fast_width=fast_w,
        token_limit=limit,
        factor=config.factor,
    )
