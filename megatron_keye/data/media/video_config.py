"""Every constant of the video front end in one typed config, with the paper's and code's values.

Keye-VL-1.5's paper and its released `keye-vl-utils==1.5.2` disagree on two numbers: a frame is
fast when its similarity with the latest slow frame reaches 0.95 (paper) or 0.9 (code), and the
video budget is 75,000 tokens (paper) or 65,536 (code). `VideoConfig.released()` (the default)
reproduces the code; `VideoConfig.paper()` the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from megatron_keye.data.media.image import IMAGE_FACTOR, TOKEN_PIXELS

VideoBackend = Literal["auto", "decord", "pyav"]
VideoTimestamps = Literal["index", "pts"]

# The released budget floors min_pixels (and the fast-frame max) at 48 tokens, whatever the config.
VIDEO_MIN_PIXELS_FLOOR = 48 * TOKEN_PIXELS


@dataclass(kw_only=True, frozen=True)
class VideoConfig:
    """Sampling, SlowFast classification and token-budget settings for one video.

    Pixel counts are in pixels (tokens x 784), as in the reference, so sizes agree exactly.
    """

    fps: float = 2.0  # sampling rate, capped by the video's own frame rate
    min_pixels: int = 48 * TOKEN_PIXELS  # per frame; also the divisor of the frame cap
    max_pixels: int = 768 * TOKEN_PIXELS  # per slow frame
    total_pixels: int = 65536 * TOKEN_PIXELS  # whole-video budget (65,536 tokens)
    max_frames: int | None = None  # optional extra cap on sampled frames
    fast_token_ratio: float = 0.3  # fast-frame tokens = 30% of slow (at least min)
    frame_similarity_threshold: float = 0.9  # below this vs the latest slow frame -> slow
    patch_similarity_threshold: float = 0.7  # a patch is similar when its cosine exceeds this
    similarity_min_pixels: int = 48 * TOKEN_PIXELS  # ... and at >= 48 tokens
    similarity_max_pixels: int = 256 * TOKEN_PIXELS  # frames are compared at <= 256 tokens
    similarity_patch_size: int = IMAGE_FACTOR  # 28x28 comparison patches
    factor: int = IMAGE_FACTOR  # every frame side is a multiple of this
    backend: VideoBackend = "auto"  # per stream, the reader that is right (video_backends.py)
    # Frame times: "index" = index / average fps, as keye-vl-utils (off on variable frame rate);
    # "pts" = true presentation times from the first frame (also used by start/end trimming).
    timestamps: VideoTimestamps = "index"
    # PyAV: keyframe segments decoded in parallel (0: one per core, at most 4); decord: its
    # num_threads (0: automatic). Data-loader worker processes usually want 1.
    decode_threads: int = 0
    decode_timeout_seconds: float | None = 600.0  # decoding a video for longer is an error
    # Frames resized/converted per step: one keeps the temporaries in a core's L2 (measured fastest).
    similarity_chunk_frames: int = 1

    def __post_init__(self) -> None:
        positive = (
            "fps",
            "min_pixels",
            "max_pixels",
            "total_pixels",
            "similarity_min_pixels",
            "similarity_max_pixels",
            "similarity_patch_size",
            "factor",
            "similarity_chunk_frames",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"VideoConfig.{name} must be a positive number, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"VideoConfig.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})"
            )
        if self.factor % self.similarity_patch_size:
            raise ValueError(
                f"VideoConfig.similarity_patch_size ({self.similarity_patch_size}) must divide "
                f"factor ({self.factor})"
            )
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"VideoConfig.max_frames must be >= 1 or None, got {self.max_frames}")
        if not 0.0 < self.fast_token_ratio <= 1.0:
            raise ValueError(
                f"VideoConfig.fast_token_ratio must be in (0, 1], got {self.fast_token_ratio}"
            )
        for name in ("frame_similarity_threshold", "patch_similarity_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"VideoConfig.{name} must be in [0, 1], got {value}")
        if self.backend not in ("auto", "decord", "pyav"):
            raise ValueError(
                f"VideoConfig.backend must be 'auto', 'decord' or 'pyav', got {self.backend!r}"
            )
        if self.timestamps not in ("index", "pts"):
            raise ValueError(
                f"VideoConfig.timestamps must be 'index' or 'pts', got {self.timestamps!r}"
            )
        if self.decode_threads < 0:
            raise ValueError(f"VideoConfig.decode_threads must be >= 0, got {self.decode_threads}")
        if self.decode_timeout_seconds is not None and self.decode_timeout_seconds <= 0:
            raise ValueError(
                "VideoConfig.decode_timeout_seconds must be positive or None, got "
                f"{self.decode_timeout_seconds}"
            )

    @classmethod
    def released(cls, **overrides) -> VideoConfig:
        """keye-vl-utils 1.5.2: frame threshold 0.9, budget 65,536 tokens."""
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides) -> VideoConfig:
        """The technical report (arXiv 2509.01563): frame threshold 0.95, budget 75,000 tokens."""
        values = {"frame_similarity_threshold": 0.95, "total_pixels": 75000 * TOKEN_PIXELS}
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides) -> VideoConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **overrides)

    @property
    def total_tokens(self) -> float:
        """The video budget in LLM tokens."""
        return self.total_pixels / (self.factor * self.factor)
