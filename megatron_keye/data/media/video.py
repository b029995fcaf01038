"""Video decoding and frame sampling with PyAV (always available) or decord.

Sampling follows keye-vl-utils 1.5.2 (`smart_nframes`): fps = min(config.fps, video fps), a frame
cap of int(total_pixels / min_pixels) (1365 by default), indices
`torch.linspace(0, n - 1, nframes).round()` and timestamps index / fps in seconds
(`config.timestamps = "pts"`: the frames' true presentation times instead).

`backend: auto` picks, per stream, the reader (`video_backends.choose_backend`) that delivers the
right frames with decord's pixels where decord's are right. Frames are decoded in a
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

from megatron_keye.data.media.image import describe_source
from megatron_keye.data.media.video_backends import BackendError, auto_backend, open_reader
from megatron_keye.data.media.video_config import VideoConfig

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
    backend_reason: str = ""  # why `backend: auto` chose this reader

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


def frame_range_by_times(
    times: list[float], *, start: float | None, end: float | None, name: str
) -> tuple[int, int]:
    """[first, last] frame numbers whose presentation time (sorted seconds) lies in [start, end]."""
    import bisect

    for label, value in (("start", start), ("end", end)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise VideoDecodeError(f"video {name}: {label}={value} must be a time >= 0 in seconds")
    first = 0 if start is None else bisect.bisect_left(times, start)
    last = len(times) - 1 if end is None else bisect.bisect_right(times, end) - 1
    if first > last:
        raise VideoDecodeError(
            f"video {name}: no frame lies in start={start}, end={end} (frames span "
            f"{times[0]:.3f} to {times[-1]:.3f} s, {len(times)} frames)"
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
    times: list[float] | None = None,
) -> torch.Tensor:
    """Frame numbers to decode: linspace over the (trimmed) clip, rounded, as the reference.

    `times` (every frame's presentation time) trims by those instead of index / fps.
    """
    if times is not None:
        first, last = frame_range_by_times(times, start=start, end=end, name=name)
    else:
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
        import av  # noqa: F401  (before decord, see video_backends._import_decord)
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

    def __init__(
        self,
        *,
        name: str,
        reader,
        indices: torch.Tensor,
        config: VideoConfig,
        timestamps: torch.Tensor | None = None,
        backend_reason: str = "",
    ):
        self.name = name
        self.indices = indices
        self.video_fps = reader.fps
        self.total_frames = reader.total_frames
        self.timestamps = (
            frame_timestamps(indices, reader.fps) if timestamps is None else timestamps
        )
        self.backend = reader.name
        self.backend_reason = backend_reason
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
            backend_reason=self.backend_reason,
        )


def _open_reader(backend: str, source, config: VideoConfig):
    return _call_with_timeout(
        lambda: open_reader(backend, source, threads=config.decode_threads),
        config.decode_timeout_seconds,
        backend,
    )


def _reader_order(source, config: VideoConfig, name: str, failures: list[str]):
    """[(backend, opened reader or None, reason)] to try in order, per `config.backend`.

    "auto" opens the stream with PyAV, looks at it (`video_backends.auto_backend`) and puts the
    reader the rule table picks first, the other one second; when PyAV cannot open it, decord.
    """
    has_decord = decord_available()
    if config.backend == "decord" and not has_decord:
        raise VideoDecodeError(f"video {name}: backend 'decord' requested but not installed")
    if config.backend != "auto":
        return [(config.backend, None, "")]
    try:
        pyav = _open_reader("pyav", source, config)
        choice, reason = _call_with_timeout(
            lambda: auto_backend(pyav), config.decode_timeout_seconds, "pyav"
        )
    except Exception as error:  # decoder libraries raise their own error types
        failures.append(f"pyav: {type(error).__name__}: {_first_line(error)}")
        if not has_decord:
            return []
        return [("decord", None, "PyAV cannot open the input")]
    pyav_entry = ("pyav", pyav, reason if choice == "pyav" else f"decord failed ({reason})")
    if choice == "decord" and has_decord:
        return [("decord", None, reason), pyav_entry]
    if choice == "decord":
        return [("pyav", pyav, f"decord not installed ({reason})")]
    return [pyav_entry, ("decord", None, f"PyAV failed ({reason})")] if has_decord else [pyav_entry]


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
    path or "<bytes len=...>"). With backend "auto" the reader is chosen per stream
    (`video_backends.choose_backend`); the other one takes over when the chosen one cannot open
    the input or fails before delivering a frame. Decoder libraries' own logging is kept quiet;
    a failure is reported once, as a `VideoDecodeError` naming the input.
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

    failures: list[str] = []
    order = _reader_order(source, config, name, failures)
    for position, (backend, reader, reason) in enumerate(order):
        if reader is None:
            try:
                reader = _open_reader(backend, source, config)
            except Exception as error:  # decoder libraries raise their own error types
                failures.append(f"{backend}: {type(error).__name__}: {_first_line(error)}")
                continue
        if reader.total_frames < 1:
            raise VideoDecodeError(f"video {name}: the video has no frames")
        if not (math.isfinite(reader.fps) and reader.fps > 0):
            raise VideoDecodeError(f"video {name}: unknown frame rate ({reader.fps})")
        times = None
        if config.timestamps == "pts":
            try:
                times = reader.frame_times(list(range(reader.total_frames)))
            except Exception as error:
                failures.append(f"{backend}: no presentation times: {_first_line(error)}")
                continue
        indices = sample_frame_indices(
            reader.total_frames,
            reader.fps,
            config=config,
            start=start,
            end=end,
            name=name,
            times=times,
        )
        timestamps = (
            None
            if times is None
            else torch.tensor([times[i] for i in indices.tolist()], dtype=torch.float32)
        )
        stream = VideoStream(
            name=name,
            reader=reader,
            indices=indices,
            config=config,
            timestamps=timestamps,
            backend_reason=reason,
        )
        if position + 1 < len(order):  # a backend failing before its first frame falls back
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
