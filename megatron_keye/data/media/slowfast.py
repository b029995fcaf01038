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
resizing, HSV and unit vectors are computed once per frame, a chunk of frames at a time with
batched tensor ops (the reference converts both frames of every pair again), and only the cheap
key-versus-frame product runs per frame. Frames may come from a `FrameSource` that is still
decoding: each chunk waits only for its own frames.

On the resize, the spec (reference/keye-vl-1.5.md §2.3) describes `F.interpolate(frames.float())`
followed by truncation to uint8. The released code passes the uint8 frames themselves to
`F.interpolate`, which runs torch's fixed-point uint8 kernel (rounded, and different from the
truncated float path in about half the pixels, by one level); there is no float intermediate to
truncate. We follow the released code; the oracle tests check frame types against keye-vl-utils.
"""

from __future__ import annotations

from typing import Protocol

import torch

from megatron_keye.data.media.color import rgb_to_hsv
from megatron_keye.data.media.image import resize_uint8, smart_resize
from megatron_keye.data.media.video_config import VideoConfig

SLOW = 0
FAST = 1
_NORM_EPSILON = 1e-8
_DARK_NORM = 0.01


class FrameSource(Protocol):
    """Frames that become available in order (a `video.VideoStream` is one)."""

    @property
    def num_frames(self) -> int: ...

    def wait_for(self, count: int) -> torch.Tensor:
        """uint8 [N, 3, H, W] with at least frames [0, count) valid."""
        ...


class _ReadyFrames:
    """A tensor of frames seen as a FrameSource."""

    def __init__(self, frames: torch.Tensor):
        self.frames = frames
        self.num_frames = frames.shape[0]

    def wait_for(self, count: int) -> torch.Tensor:
        return self.frames


def similarity_size(height: int, width: int, *, config: VideoConfig) -> tuple[int, int]:
    """(h, w) at which frames are compared: smart_resize to 48..256 tokens (reference constants)."""
    return smart_resize(
        height,
        width,
        factor=config.factor,
        min_pixels=config.similarity_min_pixels,
        max_pixels=config.similarity_max_pixels,
    )


def to_patches(images: torch.Tensor, *, patch_size: int) -> torch.Tensor:
    """[N, C, h, w] -> [N, gh, gw, C, p, p] (contiguous): raster patches, (channel, row, column)."""
    frames, channels, height, width = images.shape
    gh, gw = height // patch_size, width // patch_size
    blocks = images.reshape(frames, channels, gh, patch_size, gw, patch_size)
    return blocks.permute(0, 2, 4, 1, 3, 5).contiguous()


def patch_unit_vectors(
    hsv_patches: torch.Tensor, *, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV uint8 patches [N, gh, gw, 3, p, p] -> (unit vectors float32 [N, P, 3*p*p], dark [N, P]).

    Each patch vector is (channel, row, column) like the reference's
    `rearrange("c (h p1) (w p2) -> h w (c p1 p2)")`, in raster patch order. A patch is dark when its
    norm (+1e-8) is below 0.01, i.e. when it is all zeros. `out` (float32, at least that size)
    receives the vectors: reusing one buffer avoids fresh page faults for every chunk.
    """
    frames, gh, gw = hsv_patches.shape[:3]
    source = hsv_patches.reshape(frames, gh * gw, -1)
    if out is None:
        patches = source.to(torch.float32)
    else:
        patches = out.view(-1)[: source.numel()].view(source.shape).copy_(source)
    norms = torch.norm(patches, p=2, dim=-1, keepdim=True) + _NORM_EPSILON
    dark = norms.squeeze(-1) < _DARK_NORM
    return patches.div_(norms), dark


def frame_unit_vectors(
    frames: torch.Tensor,
    *,
    size: tuple[int, int],
    patch_size: int,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB frames [N, 3, H, W] -> unit patch vectors and dark masks at comparison `size`.

    HSV is per pixel, so the RGB pixels are first regrouped into patches (a uint8 copy) and the
    conversion writes the patch layout directly; only then is anything widened to float.
    """
    resized = resize_uint8(frames, *size)
    return patch_unit_vectors(rgb_to_hsv(to_patches(resized, patch_size=patch_size)), out=out)


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
    pair = torch.stack((frame_a, frame_b))
    units, dark = frame_unit_vectors(
        pair, size=tuple(pair.shape[2:]), patch_size=config.similarity_patch_size
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
    """Unit patch vectors of frames [start, end), computed a chunk of frames at a time."""

    def __init__(self, source: FrameSource, *, size: tuple[int, int], config: VideoConfig):
        self._source = source
        self._size = size
        self._config = config
        self.start = 0
        self.end = 0
        self.units = torch.empty(0)
        self.dark = torch.empty(0, dtype=torch.bool)
        self._buffer = torch.empty(
            config.similarity_chunk_frames * size[0] * size[1] * 3, dtype=torch.float32
        )

    def load_from(self, first: int) -> None:
        last = min(first + self._config.similarity_chunk_frames, self._source.num_frames)
        frames = self._source.wait_for(last)[first:last]
        self.units, self.dark = frame_unit_vectors(
            frames, size=self._size, patch_size=self._config.similarity_patch_size, out=self._buffer
        )
        self.start, self.end = first, last


def classify_slow_fast(
    frames: torch.Tensor | FrameSource, *, config: VideoConfig | None = None
) -> torch.Tensor:
    """Frame types of uint8 frames [N, 3, H, W]: int32 [N], 0 = slow, 1 = fast (as the reference).

    Frames are compared with the latest slow frame at `similarity_size`; the first is always slow.
    `frames` may be a tensor or a FrameSource still being decoded.
    """
    config = config or VideoConfig()
    source = _ReadyFrames(frames) if isinstance(frames, torch.Tensor) else frames
    num_frames = source.num_frames
    types = torch.full((num_frames,), FAST, dtype=torch.int32)
    if num_frames == 0:
        return types
    first = source.wait_for(1)
    if first.dtype != torch.uint8 or first.dim() != 4 or first.shape[1] != 3:
        raise ValueError(
            f"classify_slow_fast expects uint8 frames [N, 3, H, W], got {first.dtype} "
            f"{tuple(first.shape)}"
        )
    types[0] = SLOW
    size = similarity_size(first.shape[2], first.shape[3], config=config)
    chunk = _ChunkedUnitVectors(source, size=size, config=config)
    chunk.load_from(0)
    key_units, key_dark = chunk.units[0].clone(), chunk.dark[0].clone()  # the buffer is reused
    # The reference compares a Python float (the float32 share) with the threshold: double.
    threshold = config.frame_similarity_threshold
    for position in range(1, num_frames):
        if position >= chunk.end:
            chunk.load_from(position)
        offset = position - chunk.start
        share = similarity_to_key(
            key_units,
            key_dark,
            chunk.units[offset : offset + 1],
            chunk.dark[offset : offset + 1],
            patch_threshold=config.patch_similarity_threshold,
        )
        if float(share[0]) < threshold:
            types[position] = SLOW
            key_units, key_dark = chunk.units[offset].clone(), chunk.dark[offset].clone()
    return types


def slow_frame_indices(frame_types: torch.Tensor) -> list[int]:
    """Positions of the slow frames in a frame-type vector."""
    return (frame_types == SLOW).nonzero().flatten().tolist()
