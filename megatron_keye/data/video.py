"""Video decoding and frame sampling: decord first, PyAV as the always-available fallback.

Sampling follows keye-vl-utils 1.5.2 (`smart_nframes`): fps = min(config.fps, video fps), a frame
cap of int(total_pixels / min_pixels) (1365 by default), indices
`torch.linspace(0, n - 1, nframes).round()` and timestamps index / fps in seconds.

Both backends return the same frames bit for bit. decord numbers frames by sorting the stream's
packets by pts; the PyAV path does the same, decodes sequentially (no approximate time seeks) and
keeps the frames whose pts are wanted. For codecs where it is safe it asks the decoder to skip
non-reference frames that are not wanted (nothing else depends on them), which removes a large
share of the decoding work without changing a single decoded pixel; if a wanted frame does not come
out, it decodes again without skipping. Errors (not a video, truncated, no frames, a decoder that
never returns) raise `VideoDecodeError` naming the input.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from megatron_keye.data.image import describe_source
from megatron_keye.data.video_config import VideoConfig

T = TypeVar("T")

# Decoders for which AVDISCARD_NONREF drops only frames no other frame predicts from.
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video"})


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


def _open_source(source: str | os.PathLike | bytes) -> str | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)


def _probe_decord(source, threads: int):
    import decord

    reader = decord.VideoReader(_open_source(source), ctx=decord.cpu(0), num_threads=threads)
    return reader, len(reader), float(reader.get_avg_fps())


def _read_decord(reader, indices: list[int]) -> torch.Tensor:
    batch = reader.get_batch(indices)
    frames = torch.utils.dlpack.from_dlpack(batch.to_dlpack())
    if frames.dim() != 4 or frames.shape[-1] != 3:
        # decord returns malformed frames for videos rotated by 90/270 degrees.
        raise VideoDecodeError(f"decord returned frames of shape {tuple(frames.shape)}")
    return frames


class _PyAVVideo:
    """One video stream read with PyAV, numbering frames as decord does (packets sorted by pts)."""

    def __init__(self, source, threads: int):
        import av

        self._av = av
        self._source = source
        self._threads = threads
        container = self._open()
        try:
            stream = container.streams.best("video")
            if stream is None:
                raise VideoDecodeError("the file has no video stream")
            self.stream_index = stream.index
            rate = stream.average_rate
            self.fps = float(rate) if rate else float("nan")
            self.codec_name = stream.codec_context.name
            pts = [
                packet.pts
                for packet in container.demux(stream)
                if not (packet.size == 0 and packet.pts is None and packet.dts is None)
            ]
        finally:
            container.close()
        self.total_frames = len(pts)
        self.pts_valid = all(p is not None for p in pts) and len(set(pts)) == len(pts)
        self.sorted_pts = sorted(pts) if self.pts_valid else []
        self.frames_decoded = 0  # frames the decoder produced in the last read (diagnostics)

    def _open(self):
        source = self._source
        if isinstance(source, bytes):
            return self._av.open(io.BytesIO(source), mode="r")
        return self._av.open(os.fspath(source), mode="r")

    def read(self, indices: list[int]) -> torch.Tensor:
        """Decode the frames at `indices` (sorted, unique) into uint8 [N, H, W, 3]."""
        skip = self.pts_valid and self.codec_name in _SKIP_NONREF_CODECS
        frames = self._decode(indices, skip_unwanted=skip)
        if frames is None and skip:
            frames = self._decode(indices, skip_unwanted=False)
        if frames is None:
            raise VideoDecodeError(
                f"could not decode all {len(indices)} wanted frames of {self.total_frames}"
            )
        return frames

    def _decode(self, indices: list[int], *, skip_unwanted: bool) -> torch.Tensor | None:
        wanted_by_key: dict[int, int] = {}
        for slot, index in enumerate(indices):
            key = self.sorted_pts[index] if self.pts_valid else index
            wanted_by_key[key] = slot
        out: np.ndarray | None = None
        ordinal = 0
        container = self._open()
        try:
            stream = container.streams.video[self._stream_position(container)]
            stream.thread_type = "AUTO"
            stream.thread_count = self._threads
            codec = stream.codec_context
            for packet in container.demux(stream):
                if skip_unwanted:
                    codec.skip_frame = "DEFAULT" if packet.pts in wanted_by_key else "NONREF"
                for frame in packet.decode():
                    key = frame.pts if self.pts_valid else ordinal
                    ordinal += 1
                    self.frames_decoded = ordinal
                    slot = wanted_by_key.get(key)
                    if slot is None:
                        continue
                    image = self._to_rgb(frame)
                    if out is None:
                        out = np.empty((len(indices), *image.shape), dtype=np.uint8)
                    if image.shape != out.shape[1:]:
                        image = self._to_rgb(frame, size=out.shape[1:3])
                    out[slot] = image
                    del wanted_by_key[key]
                    if not wanted_by_key:
                        break
                if not wanted_by_key:
                    break
        finally:
            container.close()
        if wanted_by_key or out is None:
            return None
        return torch.from_numpy(out)

    def _stream_position(self, container) -> int:
        for position, stream in enumerate(container.streams.video):
            if stream.index == self.stream_index:
                return position
        raise VideoDecodeError("the video stream disappeared on reopening")

    @staticmethod
    def _to_rgb(frame, size: tuple[int, int] | None = None) -> np.ndarray:
        """RGB24 like decord: rotated by the display matrix, scaled to the first frame's size."""
        quarter_turns = (round(frame.rotation / 90) % 4) if frame.rotation else 0
        if size is None:
            image = frame.to_ndarray(format="rgb24")
        else:
            height, width = size if quarter_turns % 2 == 0 else (size[1], size[0])
            image = frame.reformat(
                width=width, height=height, format="rgb24", interpolation="BILINEAR"
            ).to_ndarray()
        if quarter_turns:
            image = np.ascontiguousarray(np.rot90(image, quarter_turns))
        return image


def _decode_with(backend: str, source, indices_for, config: VideoConfig, name: str):
    """Open with one backend, choose indices from its metadata, read the frames."""
    what = f"{backend} on video {name}"
    if backend == "decord":
        reader, total, fps = _call_with_timeout(
            lambda: _probe_decord(source, config.decode_threads),
            config.decode_timeout_seconds,
            what,
        )
        indices = indices_for(total, fps)
        frames = _call_with_timeout(
            lambda: _read_decord(reader, indices.tolist()), config.decode_timeout_seconds, what
        )
    else:
        video = _call_with_timeout(
            lambda: _PyAVVideo(source, config.decode_threads), config.decode_timeout_seconds, what
        )
        total, fps = video.total_frames, video.fps
        indices = indices_for(total, fps)
        frames = _call_with_timeout(
            lambda: video.read(indices.tolist()), config.decode_timeout_seconds, what
        )
    return frames, indices, total, fps


def decode_video(
    source: str | os.PathLike | bytes,
    *,
    config: VideoConfig | None = None,
    key: str | None = None,
    start: float | None = None,
    end: float | None = None,
) -> DecodedVideo:
    """Decode the sampled frames of a video file or of its bytes (as stored in a shard).

    `start`/`end` (seconds) restrict sampling to frames whose time lies in [start, end];
    timestamps stay relative to the start of the video. `key` names the input in errors (else the
    path or "<bytes len=...>"). With backend "auto", decord is tried first and PyAV takes over
    if decord is missing or fails on this input.
    """
    config = config or VideoConfig()
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    if not isinstance(source, str | os.PathLike | bytes):
        raise VideoDecodeError(
            f"video {describe_source(source, key)}: expected a path or bytes, "
            f"got {type(source).__name__}"
        )
    name = describe_source(source, key)
    if isinstance(source, bytes) and len(source) == 0:
        raise VideoDecodeError(f"video {name}: empty input")
    if not isinstance(source, bytes) and not os.path.isfile(source):
        raise VideoDecodeError(f"video {name}: no such file")

    def indices_for(total: int, fps: float) -> torch.Tensor:
        if total < 1:
            raise VideoDecodeError(f"video {name}: the video has no frames")
        if not (math.isfinite(fps) and fps > 0):
            raise VideoDecodeError(f"video {name}: unknown frame rate ({fps})")
        return sample_frame_indices(total, fps, config=config, start=start, end=end, name=name)

    if config.backend == "auto":
        backends = ["decord", "pyav"] if decord_available() else ["pyav"]
    elif config.backend == "decord" and not decord_available():
        raise VideoDecodeError(f"video {name}: backend 'decord' requested but not installed")
    else:
        backends = [config.backend]

    failures = []
    for backend in backends:
        try:
            frames, indices, total, fps = _decode_with(backend, source, indices_for, config, name)
        except VideoDecodeError as error:
            if str(error).startswith(f"video {name}:"):
                raise  # a property of the video (no frames, bad trim), not of the decoder
            failures.append(f"{backend}: {error}")
            continue
        except Exception as error:  # decoder libraries raise their own error types
            failures.append(f"{backend}: {type(error).__name__}: {_first_line(error)}")
            continue
        return DecodedVideo(
            frames=frames.permute(0, 3, 1, 2),
            timestamps=frame_timestamps(indices, fps),
            indices=indices,
            video_fps=fps,
            total_frames=total,
            backend=backend,
            source_name=name,
        )
    raise VideoDecodeError(f"video {name}: cannot decode ({'; '.join(failures)})")


def _first_line(error: BaseException) -> str:
    """The first line of an error, without decord's "[time] /source/file.cc:123: " prefix."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else "(no message)"
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", line)
