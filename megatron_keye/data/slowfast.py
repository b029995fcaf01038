"""SlowFast frame classification, reproducing keye-vl-utils 1.5.2 decision for decision.

The first frame is slow. Every later frame is compared with the latest slow frame: both are
resized to at most 256 tokens (bilinear, antialiased, on uint8 as the reference does), converted
to HSV (OpenCV's fixed point), cut into 28x28 patches, and each patch is a vector of
3 * 28 * 28 HSV values. A patch pair is similar when its cosine exceeds 0.7; patches black in both
frames are ignored; frame similarity is the share of similar patches among the rest (NaN when no
patch is left). A frame whose similarity is below the frame threshold (0.9 released, 0.95 paper)
becomes slow and the new reference; any other frame (NaN included) is fast.

The arithmetic is the reference's, in the same float32 order (unit vectors = patch / (norm + 1e-8),
cosine = sum of their elementwise product, share = float32 count ratio compared with the threshold
in double precision), so borderline frames fall the same way. What is different is the schedule:
HSV and unit vectors are computed once per frame, in chunks of frames, and the latest slow frame is
compared with a whole chunk in one batched product; only the choice of the next slow frame is
sequential.
"""

from __future__ import annotations

import torch

from megatron_keye.data.color import rgb_to_hsv
from megatron_keye.data.image import resize_uint8, smart_resize
from megatron_keye.data.video_config import VideoConfig

SLOW = 0
FAST = 1
_NORM_EPSILON = 1e-8
_DARK_NORM = 0.01


def similarity_size(height: int, width: int, *, config: VideoConfig) -> tuple[int, int]:
    """(h, w) at which frames are compared: smart_resize to 48..256 tokens (reference constants)."""
    return smart_resize(
        height,
        width,
        factor=config.factor,
        min_pixels=config.similarity_min_pixels,
        max_pixels=config.similarity_max_pixels,
    )


def patch_unit_vectors(hsv: torch.Tensor, *, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV uint8 [N, 3, h, w] -> (unit vectors float32 [N, P, 3*p*p], dark mask bool [N, P]).

    Patches are taken in raster order, each flattened as (channel, row, column) like the reference's
    `rearrange("c (h p1) (w p2) -> h w (c p1 p2)")`. A patch is dark when its norm (+1e-8) < 0.01,
    i.e. when it is all zeros.
    """
    frames, channels, height, width = hsv.shape
    gh, gw = height // patch_size, width // patch_size
    patches = torch.empty((frames, gh, gw, channels, patch_size, patch_size), dtype=torch.float32)
    patches.permute(0, 3, 1, 4, 2, 5).copy_(
        hsv.reshape(frames, channels, gh, patch_size, gw, patch_size)
    )
    patches = patches.view(frames, gh * gw, channels * patch_size * patch_size)
    norms = torch.norm(patches, p=2, dim=-1, keepdim=True) + _NORM_EPSILON
    dark = norms.squeeze(-1) < _DARK_NORM
    return patches.div_(norms), dark


def similarity_to_key(
    key_units: torch.Tensor,
    key_dark: torch.Tensor,
    units: torch.Tensor,
    dark: torch.Tensor,
    *,
    patch_threshold: float,
) -> torch.Tensor:
    """Frame similarity (float32 [N], NaN when every patch is dark in both) of N frames vs a key.

    key_units [P, D], key_dark [P]; units [N, P, D], dark [N, P].
    """
    cosine = (key_units.unsqueeze(0) * units).sum(-1)  # [N, P]
    kept = ~(key_dark.unsqueeze(0) & dark)
    similar = (cosine > patch_threshold) & kept
    return similar.sum(-1).to(torch.float32) / kept.sum(-1).to(torch.float32)


def frame_similarity(
    frame_a: torch.Tensor, frame_b: torch.Tensor, *, config: VideoConfig | None = None
) -> float:
    """Similarity of two uint8 frames [3, h, w] already at comparison size (reference semantics)."""
    config = config or VideoConfig()
    units, dark = patch_unit_vectors(
        rgb_to_hsv(torch.stack((frame_a, frame_b))), patch_size=config.similarity_patch_size
    )
    return float(
        similarity_to_key(
            units[0],
            dark[0],
            units[1:],
            dark[1:],
            patch_threshold=config.patch_similarity_threshold,
        )[0]
    )


class _ChunkedUnitVectors:
    """Unit patch vectors of frames [start, end) computed on demand, a chunk of frames at a time."""

    def __init__(self, frames: torch.Tensor, *, size: tuple[int, int], config: VideoConfig):
        self._frames = frames
        self._size = size
        self._config = config
        self.start = 0
        self.end = 0
        self.units = torch.empty(0)
        self.dark = torch.empty(0, dtype=torch.bool)

    def load_from(self, first: int) -> None:
        last = min(first + self._config.similarity_chunk_frames, self._frames.shape[0])
        resized = resize_uint8(self._frames[first:last], *self._size)
        self.units, self.dark = patch_unit_vectors(
            rgb_to_hsv(resized), patch_size=self._config.similarity_patch_size
        )
        self.start, self.end = first, last


def classify_slow_fast(frames: torch.Tensor, *, config: VideoConfig | None = None) -> torch.Tensor:
    """Frame types of uint8 frames [N, 3, H, W]: int32 [N], 0 = slow, 1 = fast (as the reference).

    Frames are compared with the latest slow frame at `similarity_size`; the first is always slow.
    """
    config = config or VideoConfig()
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(
            f"classify_slow_fast expects uint8 frames [N, 3, H, W], got {frames.dtype} "
            f"{tuple(frames.shape)}"
        )
    num_frames = frames.shape[0]
    types = torch.full((num_frames,), FAST, dtype=torch.int32)
    if num_frames == 0:
        return types
    types[0] = SLOW
    size = similarity_size(frames.shape[2], frames.shape[3], config=config)
    chunk = _ChunkedUnitVectors(frames, size=size, config=config)
    chunk.load_from(0)
    key_units, key_dark = chunk.units[0], chunk.dark[0]
    position = 1
    while position < num_frames:
        if position >= chunk.end:
            chunk.load_from(position)
        offset = position - chunk.start
        shares = similarity_to_key(
            key_units,
            key_dark,
            chunk.units[offset:],
            chunk.dark[offset:],
            patch_threshold=config.patch_similarity_threshold,
        )
        # The reference compares a Python float (the float32 share) with the threshold: double.
        below = (shares.to(torch.float64) < config.frame_similarity_threshold).nonzero()
        if below.numel() == 0:
            position = chunk.end
            continue
        slow_offset = offset + int(below[0, 0])
        types[chunk.start + slow_offset] = SLOW
        key_units, key_dark = chunk.units[slow_offset].clone(), chunk.dark[slow_offset].clone()
        position = chunk.start + slow_offset + 1
    return types


def slow_frame_indices(frame_types: torch.Tensor) -> list[int]:
    """Positions of the slow frames in a frame-type vector."""
    return (frame_types == SLOW).nonzero().flatten().tolist()
