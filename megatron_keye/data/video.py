"""Video decoding and frame sampling with PyAV (always available) or decord.

Sampling follows keye-vl-utils 1.5.2 (`smart_nframes`): fps = min(config.fps, video fps), a frame
cap of int(total_pixels / min_pixels) (1365 by default), indices
`torch.linspace(0, n - 1, nframes).round()` and timestamps index / fps in seconds.

Both backends (`video_backends.py`) return the same frames bit for bit. Frames are decoded in a
background thread into one buffer and become available in order (`VideoStream.wait_for`), so
SlowFast classification runs on the first frames while later ones are still being decoded;
`decode_video` simply waits for all of them. Errors (not a video, truncated, no frames, a decoder
that stops making progress) raise `VideoDecodeError` naming the input.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from megatron_keye.data.image import describe_source
from megatron_keye.data.video_backends import BackendError, open_reader
from megatron_keye.data.video_config import VideoConfig

T = TypeVar("T")


class VideoDecodeError(ValueError):
    """A video that cannot be decoded or sampled; the message names the input."""


@dataclass(kw_only=True, frozen=True)
class DecodedVideo:
    """Sampled frames of one video.

    frames: uint8 [N, 3, H, W] RGB (a channels-last view); timestamps: float32 [N] seconds from
    the start of the video; indices: int64 [N] frame numbers in the source.
    """

    frames: torch.Tensor
    timestamps: torch.Tensor
    indices: torch.Tensor
    video_fps: float
    total_frames: int
    backend: str
    source_name: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[2])

    @property
    def width(self) -> int:
        return int(self.frames.shape[3])


def smart_nframes(total_frames: int, video_fps: float, *, config: VideoConfig) -> int:
    """Frames to sample, exactly as keye-vl-utils 1.5.2 (no min_frames, no even rounding).

    fps = min(config.fps, video_fps); cap = int(total_pixels / min_pixels), lowered by max_frames;
    n = min(int(total_frames / video_fps * fps), cap). The reference fails on clips shorter than
    one sampling period (n = 0); here such a clip yields one frame.
    """
    fps = min(config.fps, video_fps)
    cap = int(config.total_pixels / config.min_pixels)
    if config.max_frames is not None:
        cap = min(config.max_frames, cap)
    nframes = min(int(total_frames / video_fps * fps), cap)
    return max(nframes, 1) if total_frames > 0 else 0


def frame_range(
    total_frames: int, video_fps: float, *, start: float | None, end: float | None, name: str
) -> tuple[int, int]:
    """[first, last] frame numbers whose time index / fps lies in [start, end] seconds."""
    first, last = 0, total_frames - 1
    duration = last / video_fps
    if start is not None:
        if not math.isfinite(start) or start < 0:
            raise VideoDecodeError(f"video {name}: start={start} must be a time >= 0 in seconds")
        first = min(max(0, math.ceil(start * video_fps)), total_frames)
        while first > 0 and (first - 1) / video_fps >= start:
            first -= 1
        while first < total_frames and first / video_fps < start:
            first += 1
    if end is not None:
        if not math.isfinite(end) or end < 0:
            raise VideoDecodeError(f"video {name}: end={end} must be a time >= 0 in seconds")
        last = max(min(last, math.floor(end * video_fps)), -1)
        while last + 1 < total_frames and (last + 1) / video_fps <= end:
            last += 1
        while last >= 0 and last / video_fps > end:
            last -= 1
    if first > last:
        raise VideoDecodeError(
            f"video {name}: no frame lies in start={start}, end={end} (video spans 0 to "
            f"{duration:.3f} s, {total_frames} frames at {video_fps:g} fps)"
        )
    return first, last


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    *,
    config: VideoConfig,
    start: float | None = None,
    end: float | None = None,
    name: str = "<video>",
) -> torch.Tensor:
    """Frame numbers to decode: linspace over the (trimmed) clip, rounded, as the reference."""
    first, last = frame_range(total_frames, video_fps, start=start, end=end, name=name)
    clip_frames = last - first + 1
    nframes = smart_nframes(clip_frames, video_fps, config=config)
    indices = torch.linspace(0, clip_frames - 1, nframes).round().long()
    return indices + first


def frame_timestamps(indices: torch.Tensor, video_fps: float) -> torch.Tensor:
    """Seconds of each frame, float32, computed as the reference does: (1 / fps) * index."""
    step = 1.0 / video_fps
    return torch.tensor([step * i for i in indices.tolist()], dtype=torch.float32)


def decord_available() -> bool:
    """Whether decord can be imported (it has no wheels on some platforms)."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _call_with_timeout(function: Callable[[], T], timeout: float | None, what: str) -> T:
    """Run `function` in a worker thread; raise VideoDecodeError if it does not finish in time.

    A stuck native decoder cannot be killed from Python, but the caller gets an error instead of
    hanging; the worker is a daemon thread and does not keep the process alive.
    """
    if timeout is None:
        return function()
    outcome: dict[str, object] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error
        finally:
            finished.set()

    worker = threading.Thread(target=run, name="megatron-keye-video-decode", daemon=True)
    worker.start()
    if not finished.wait(timeout):
        raise VideoDecodeError(f"the decoder did not finish within {timeout:g} s ({what})")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class _FrameBuffer:
    """Frames [N, H, W, 3] written by the decoder thread; readers wait for a filled prefix."""

    def __init__(self, count: int):
        self.count = count
        self.frames: torch.Tensor | None = None
        self._filled = [False] * count
        self.ready = 0  # frames [0, ready) are filled
        self.condition = threading.Condition()
        self.error: BaseException | None = None
        self.finished = False

    def has(self, slot: int) -> bool:
        return self._filled[slot]

    def put(self, slot: int, image: torch.Tensor) -> None:
        with self.condition:
            if self.frames is None:
                self.frames = torch.empty((self.count, *image.shape), dtype=torch.uint8)
            target = self.frames
        if tuple(image.shape) != tuple(target.shape[1:]):
            raise BackendError(
                f"frame {slot} has shape {tuple(image.shape)}, the first {tuple(target.shape[1:])}"
            )
        # A plain memcpy: torch's copy_ would wake its OpenMP pool, whose spinning threads take
        # CPU from the decoders.
        np.copyto(target[slot].numpy(), image.numpy())
        with self.condition:
            self._filled[slot] = True
            while self.ready < self.count and self._filled[self.ready]:
                self.ready += 1
            self.condition.notify_all()

    def close(self, error: BaseException | None) -> None:
        with self.condition:
            self.error = error
            self.finished = True
            self.condition.notify_all()


class VideoStream:
    """The sampled frames of one video, decoded in a background thread.

    `wait_for(k)` returns the frames tensor [N, 3, H, W] once frames [0, k) are decoded;
    `result()` waits for all of them. Metadata (indices, timestamps, fps) is known at once.
    """

    def __init__(self, *, name: str, reader, indices: torch.Tensor, config: VideoConfig):
        self.name = name
        self.indices = indices
        self.video_fps = reader.fps
        self.total_frames = reader.total_frames
        self.timestamps = frame_timestamps(indices, reader.fps)
        self.backend = reader.name
        self._config = config
        self._buffer = _FrameBuffer(len(indices))
        self._deadline = (
            None
            if config.decode_timeout_seconds is None
            else time.monotonic() + config.decode_timeout_seconds
        )
        self._thread = threading.Thread(
            target=self._decode, args=(reader,), name="megatron-keye-video-decode", daemon=True
        )
        self._thread.start()

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    def _decode(self, reader) -> None:
        error: BaseException | None = None
        try:
            reader.read_into(self._buffer, self.indices.tolist())
        except BaseException as caught:  # handed to the waiting thread
            error = caught
        self._buffer.close(error)

    def wait_for(self, count: int) -> torch.Tensor:
        """Frames [N, 3, H, W] (uint8, channels-last view) with at least [0, count) decoded."""
        buffer = self._buffer
        with buffer.condition:
            while buffer.ready < count:
                if buffer.finished:
                    raise self._failure(buffer.error)
                remaining = None if self._deadline is None else self._deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise VideoDecodeError(
                        f"video {self.name}: cannot decode ({self.backend}: the decoder did not "
                        f"finish within {self._config.decode_timeout_seconds:g} s)"
                    )
                buffer.condition.wait(remaining)
            return buffer.frames.permute(0, 3, 1, 2)

    def _failure(self, error: BaseException | None) -> VideoDecodeError:
        reason = (
            "stopped early" if error is None else f"{type(error).__name__}: {_first_line(error)}"
        )
        failure = VideoDecodeError(f"video {self.name}: cannot decode ({self.backend}: {reason})")
        failure.__cause__ = error
        return failure

    def result(self) -> DecodedVideo:
        """All sampled frames with their metadata (waits for the decoder)."""
        frames = self.wait_for(self.num_frames)
        return DecodedVideo(
            frames=frames,
            timestamps=self.timestamps,
            indices=self.indices,
            video_fps=self.video_fps,
            total_frames=self.total_frames,
            backend=self.backend,
            source_name=self.name,
        )


def _backends_for(config: VideoConfig, name: str) -> list[str]:
    if config.backend == "auto":
        # PyAV first: our reader returns decord's frames bit for bit and, skipping unwanted
        # non-reference frames and decoding keyframe segments in parallel, is about twice as fast
        # as decord (docs/bench_video.md); decord stays the fallback.
        return ["pyav", "decord"] if decord_available() else ["pyav"]
    if config.backend == "decord" and not decord_available():
        raise VideoDecodeError(f"video {name}: backend 'decord' requested but not installed")
    return [config.backend]


def open_video_stream(
    source: str | os.PathLike | bytes,
    *,
    config: VideoConfig | None = None,
    key: str | None = None,
    start: float | None = None,
    end: float | None = None,
) -> VideoStream:
    """Open a video (path or bytes), choose the frames to sample and start decoding them.

    `start`/`end` (seconds) restrict sampling to frames whose time lies in [start, end];
    timestamps stay relative to the start of the video. `key` names the input in errors (else the
    path or "<bytes len=...>"). With backend "auto", PyAV is tried first and decord (when
    installed) takes over when PyAV cannot open the input or fails before delivering a frame.
    """
    config = config or VideoConfig()
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    name = describe_source(source, key)
    if not isinstance(source, str | os.PathLike | bytes):
        raise VideoDecodeError(
            f"video {name}: expected a path or bytes, got {type(source).__name__}"
        )
    if isinstance(source, bytes) and len(source) == 0:
        raise VideoDecodeError(f"video {name}: empty input")
    if not isinstance(source, bytes) and not os.path.isfile(source):
        raise VideoDecodeError(f"video {name}: no such file")

    failures = []
    backends = _backends_for(config, name)
    for position, backend in enumerate(backends):
        try:
            reader = _call_with_timeout(
                lambda backend=backend: open_reader(backend, source, threads=config.decode_threads),
                config.decode_timeout_seconds,
                backend,
            )
        except Exception as error:  # decoder libraries raise their own error types
            failures.append(f"{backend}: {type(error).__name__}: {_first_line(error)}")
            continue
        if reader.total_frames < 1:
            raise VideoDecodeError(f"video {name}: the video has no frames")
        if not (math.isfinite(reader.fps) and reader.fps > 0):
            raise VideoDecodeError(f"video {name}: unknown frame rate ({reader.fps})")
        indices = sample_frame_indices(
            reader.total_frames, reader.fps, config=config, start=start, end=end, name=name
        )
        stream = VideoStream(name=name, reader=reader, indices=indices, config=config)
        if position + 1 < len(backends):  # a backend failing before its first frame falls back
            try:
                stream.wait_for(1)
            except VideoDecodeError as error:
                failures.append(f"{backend}: {_first_line(error.__cause__ or error)}")
                continue
        return stream
    raise VideoDecodeError(f"video {name}: cannot decode ({'; '.join(failures)})")


def decode_video(
    source: str | os.PathLike | bytes,
    *,
    config: VideoConfig | None = None,
    key: str | None = None,
    start: float | None = None,
    end: float | None = None,
) -> DecodedVideo:
    """Decode the sampled frames of a video file or of its bytes (as stored in a shard).

    See `open_video_stream` for the arguments; this waits until every frame is decoded.
    """
    return open_video_stream(source, config=config, key=key, start=start, end=end).result()


def _first_line(error: BaseException) -> str:
    """The first line of an error, without decord's "[time] /source/file.cc:123: " prefix."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else "(no message)"
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", line)
