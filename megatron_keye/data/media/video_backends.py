"""The two video decoders behind `video.py`: decord and PyAV, numbering frames the same way.

decord numbers a video's frames by sorting the packets of its video stream by pts, counts them as
the frame total and reports the stream's average frame rate; it converts frames to RGB24 with
FFmpeg's swscale and turns them upright by the display matrix. The PyAV reader reproduces all of
that. Both readers deliver the same (right) frames wherever decord's are right, and the same pixels
for most streams; where the two FFmpeg builds convert to RGB differently (more than 8 bits per
sample, odd sizes with subsampled chroma) or decord is wrong or cannot decode, `choose_backend`
picks the reader to use (the rule table is below and in the README; tests measure it on a codec
matrix).

decord reads a batch keyframe segment by keyframe segment: for the first wanted frame of a segment
it seeks to the segment's keyframe (flushing the decoder) and decodes forward, never decoding the
rest of a segment once its wanted frames are out. The PyAV reader follows the same segments, so it
decodes the same pictures from the same starting points, and because every segment starts from a
flushed decoder, segments can be decoded in parallel (one single-threaded decoder per worker
thread; videos with one segment get FFmpeg's own threads instead). Frames are told apart by their
pts, never by approximate time. For codecs where AVDISCARD_NONREF drops only frames that no other
frame is predicted from, the decoder skips such frames when they are not wanted: a large share of
the work, and it cannot change any other decoded pixel. Any wanted frame that does not come out
is decoded again by a plain sequential pass from the start without skipping.

Readers deliver frames to a sink (`put(slot, image)`) in order as they are decoded, so the caller
can start working on the first frames while later ones are still being decoded.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import numpy as np
import torch

# Decoders for which AVDISCARD_NONREF drops only frames no other frame predicts from.
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video"})
_DECORD_CHUNK = 8  # frames per decord get_batch call (decord keeps its position between calls)


class BackendError(RuntimeError):
    """A decoder could not read this input (the caller adds the input's name)."""


class FrameSink(Protocol):
    """Receives decoded frames, uint8 [H, W, 3], by their slot in the wanted list."""

    def put(self, slot: int, image: torch.Tensor) -> None: ...

    def has(self, slot: int) -> bool: ...


def _open_source(source: str | os.PathLike | bytes):
    return io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)


_STDERR_LOCK = threading.Lock()
_decord_quiet = False


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send the process's native stderr (fd 2) to /dev/null while decord opens an input.

    decord logs a failed open with the whole "file name", which for bytes is the input itself;
    our caller reports the failure once, in its own words. Other threads' stderr output in this
    short window is lost too (the lock keeps concurrent opens from undoing each other's redirect).
    """
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no usable fd 2: nothing to silence
            yield
            return
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 2)
            finally:
                os.close(devnull)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _import_decord():
    """decord, with its FFmpeg logging turned off (failures are reported by the caller)."""
    global _decord_quiet
    # PyAV's FFmpeg libraries must be loaded before decord's bundled ones: the other way round,
    # PyAV's libvpx encoders reject their options (measured with PyAV 18 and decord 0.6).
    import av  # noqa: F401
    import decord

    if not _decord_quiet:
        decord.logging.set_level(decord.logging.QUIET)
        _decord_quiet = True
    return decord


class DecordReader:
    """decord.VideoReader: frame count and fps at open, frames through get_batch."""

    name = "decord"

    def __init__(self, source: str | os.PathLike | bytes, *, threads: int):
        decord = _import_decord()
        with _native_stderr_silenced():
            self._reader = decord.VideoReader(
                _open_source(source), ctx=decord.cpu(0), num_threads=threads
            )
        self.total_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())

    def frame_times(self, indices: list[int]) -> list[float]:
        """Presentation times (s) of frames, from decord (rounded by it to 0.1 ms), from frame 0."""
        if not indices:
            return []
        first = float(self._reader.get_frame_timestamp([0])[0, 0])
        times = self._reader.get_frame_timestamp(list(indices))[:, 0]
        return [float(t) - first for t in times]

    def read_into(self, sink: FrameSink, indices: list[int]) -> None:
        for first in range(0, len(indices), _DECORD_CHUNK):
            chunk = indices[first : first + _DECORD_CHUNK]
            batch = self._reader.get_batch(chunk)
            frames = torch.utils.dlpack.from_dlpack(batch.to_dlpack())
            if frames.dim() != 4 or frames.shape[-1] != 3:
                # decord returns malformed frames for videos rotated by 90 or 270 degrees.
                raise BackendError(f"decord returned frames of shape {tuple(frames.shape)}")
            for offset in range(len(chunk)):
                sink.put(first + offset, frames[offset])


class PyAVReader:
    """A video stream read with PyAV, numbering frames as decord does (packets sorted by pts)."""

    name = "pyav"

    def __init__(self, source: str | os.PathLike | bytes, *, threads: int):
        import av

        self._av = av
        self._source = source
        self._threads = threads
        with self._open() as container:
            stream = container.streams.best("video")
            if stream is None:
                raise BackendError("the file has no video stream")
            self._stream_index = stream.index
            rate = stream.average_rate
            self.fps = float(rate) if rate else float("nan")
            self._codec_name = stream.codec_context.name
            self._time_base = stream.time_base or Fraction(0)
            video_format = stream.codec_context.format
            container_format = container.format.name
            pts, keyframes = [], []
            for packet in container.demux(stream):
                if packet.size == 0 and packet.pts is None and packet.dts is None:
                    continue  # the end-of-stream marker PyAV adds
                if packet.is_keyframe:
                    keyframes.append(len(pts))  # decode-order position, as decord records it
                pts.append(packet.pts)
        self.total_frames = len(pts)
        self._pts_valid = all(p is not None for p in pts) and len(set(pts)) == len(pts)
        self._sorted_pts = sorted(pts) if self._pts_valid else []
        self._keyframes = keyframes
        self.frames_decoded = 0  # frames the decoders produced in the last pass (diagnostics)
        self.info = StreamInfo.of(
            container_format,
            self._codec_name,
            video_format,
            reorders=self._pts_valid and self._sorted_pts != pts,
            open_gop=self._pts_valid and _has_leading_frames(pts, keyframes),
        )
        self._rotation: int | None = None

    @property
    def rotation(self) -> int:
        """The display rotation in degrees (0, 90, 180, 270), read from the first decoded frame."""
        if self._rotation is None:
            self._rotation = 0
            with self._open() as container:
                stream = next(s for s in container.streams.video if s.index == self._stream_index)
                for frame in container.decode(stream):
                    self._rotation = round(frame.rotation / 90) % 4 * 90 if frame.rotation else 0
                    break
        return self._rotation

    def frame_times(self, indices: list[int]) -> list[float]:
        """Presentation times (s) of frames, from the first frame's (exact: pts x time base)."""
        if not self._pts_valid or not self._time_base:
            raise BackendError("the stream has no usable presentation timestamps")
        first = self._sorted_pts[0]
        return [float((self._sorted_pts[i] - first) * self._time_base) for i in indices]

    def _open(self):
        source = self._source
        if isinstance(source, bytes):
            return self._av.open(io.BytesIO(source), mode="r")
        return self._av.open(os.fspath(source), mode="r")

    def read_into(self, sink: FrameSink, indices: list[int]) -> None:
        """Decode the frames at `indices` (sorted, unique) into the sink."""
        skip = self._pts_valid and self._codec_name in _SKIP_NONREF_CODECS
        if self._pts_valid:
            self.segment_pass(sink, indices, skip_unwanted=skip)
        else:  # frames can only be told apart by their order: one pass from the start
            self.decode_pass(sink, indices, skip_unwanted=False)
        missing = [slot for slot in range(len(indices)) if not sink.has(slot)]
        if missing and skip:
            self.decode_pass(sink, indices, skip_unwanted=False)
            missing = [slot for slot in range(len(indices)) if not sink.has(slot)]
        if missing:
            raise BackendError(
                f"could decode only {len(indices) - len(missing)} of the {len(indices)} wanted "
                f"frames ({self.total_frames} in the stream)"
            )

    def keyframe_position(self, index: int) -> int:
        """decord's LocateKeyframe: the last keyframe position <= index (0 before the first)."""
        keyframes = self._keyframes
        if not keyframes or index <= keyframes[0]:
            return 0
        return keyframes[bisect.bisect_right(keyframes, index) - 1]

    def segments(self, indices: list[int]) -> list[tuple[int, list[int]]]:
        """(keyframe position, slots of `indices`) for each segment decord would seek to."""
        groups: dict[int, list[int]] = {}
        for slot, index in enumerate(indices):
            groups.setdefault(self.keyframe_position(index), []).append(slot)
        return sorted(groups.items())

    def segment_pass(self, sink: FrameSink, indices: list[int], *, skip_unwanted: bool) -> None:
        """Decode each keyframe segment from its keyframe, segments spread over worker threads."""
        segments = self.segments(indices)
        workers = min(self._threads or min(os.cpu_count() or 1, 4), len(segments))
        decoder_threads = 1 if workers > 1 else self._threads
        queue = iter(segments)
        lock = threading.Lock()
        errors: list[BaseException] = []
        counts: list[int] = []

        def work() -> None:
            try:
                with self._open() as container:
                    stream = self._video_stream(container, decoder_threads)
                    decoded = 0
                    while True:
                        with lock:
                            segment = next(queue, None)
                        if segment is None or errors:
                            break
                        keyframe, slots = segment
                        wanted = {
                            self._sorted_pts[indices[slot]]: slot
                            for slot in slots
                            if not sink.has(slot)
                        }
                        decoded += self._decode_segment(
                            container,
                            stream,
                            sink,
                            self._sorted_pts[keyframe],
                            wanted,
                            skip_unwanted,
                        )
                    with lock:
                        counts.append(decoded)
            except BaseException as error:  # reported by the calling thread
                with lock:
                    errors.append(error)

        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
        for thread in threads:
            thread.start()
        work()
        for thread in threads:
            thread.join()
        self.frames_decoded = sum(counts)
        if errors:
            raise errors[0]

    def _video_stream(self, container, decoder_threads: int):
        stream = next(s for s in container.streams.video if s.index == self._stream_index)
        stream.thread_type = "AUTO"
        stream.thread_count = decoder_threads
        return stream

    def _decode_segment(
        self, container, stream, sink: FrameSink, keyframe_pts: int, wanted: dict, skip_unwanted
    ) -> int:
        """Seek to a segment's keyframe and decode until its wanted frames (pts -> slot) are out."""
        if not wanted:
            return 0
        container.seek(keyframe_pts, stream=stream, backward=True)
        codec = stream.codec_context
        codec.flush_buffers()
        decoded = 0
        size: tuple[int, int] | None = None
        for packet in container.demux(stream):
            if skip_unwanted:
                codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
            for frame in packet.decode():
                decoded += 1
                slot = wanted.pop(frame.pts, None)
                if slot is not None:
                    image = _to_rgb(frame, size)
                    size = size or (image.shape[0], image.shape[1])
                    sink.put(slot, torch.from_numpy(image))
            if not wanted:
                break
        codec.skip_frame = "DEFAULT"
        return decoded

    def decode_pass(self, sink: FrameSink, indices: list[int], *, skip_unwanted: bool) -> None:
        """One pass from the start, delivering the wanted frames the sink does not have yet."""
        wanted: dict[int, int] = {}
        for slot, index in enumerate(indices):
            if not sink.has(slot):
                wanted[self._sorted_pts[index] if self._pts_valid else index] = slot
        ordinal = 0
        size: tuple[int, int] | None = None
        with self._open() as container:
            stream = next(s for s in container.streams.video if s.index == self._stream_index)
            stream.thread_type = "AUTO"
            stream.thread_count = self._threads
            codec = stream.codec_context
            for packet in container.demux(stream):
                if not wanted:
                    break
                if skip_unwanted:
                    codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                for frame in packet.decode():
                    key = frame.pts if self._pts_valid else ordinal
                    ordinal += 1
                    slot = wanted.pop(key, None)
                    if slot is None:
                        continue
                    image = _to_rgb(frame, size)
                    size = size or (image.shape[0], image.shape[1])
                    sink.put(slot, torch.from_numpy(image))
        self.frames_decoded = ordinal


@dataclass(kw_only=True, frozen=True)
class StreamInfo:
    """What `choose_backend` looks at: properties of a video stream known when it is opened."""

    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "mpegts"
    codec: str  # FFmpeg decoder name, e.g. "h264", "hevc", "mpeg4", "av1"
    pix_fmt: str  # e.g. "yuv420p", "yuv420p10le" ("" when unknown)
    bit_depth: int  # bits per sample of the first component (8 when unknown)
    odd_subsampled: bool  # an odd width (height) in a format with horizontally (vertically)
    # subsampled chroma, e.g. 65 x 49 in 4:2:0
    reorders: bool  # frames are presented in another order than decoded (B-frames)
    open_gop: bool = False  # a keyframe after the first is followed (in decode order) by frames
    # shown before it (open GOPs: HEVC CRA pictures with leading pictures, x264 --open-gop)

    @classmethod
    def of(
        cls, container: str, codec: str, video_format, *, reorders: bool, open_gop: bool = False
    ) -> StreamInfo:
        pix_fmt, bit_depth, odd = "", 8, False
        if video_format is not None:
            pix_fmt = video_format.name
            components = video_format.components
            if components:
                bit_depth = int(components[0].bits)
            width, height = int(video_format.width), int(video_format.height)
            if len(components) >= 3 and width and height:
                chroma = components[1]
                odd = (width % 2 == 1 and chroma.width < width) or (
                    height % 2 == 1 and chroma.height < height
                )
        return cls(
            container=container,
            codec=codec,
            pix_fmt=pix_fmt,
            bit_depth=bit_depth,
            odd_subsampled=odd,
            reorders=reorders,
            open_gop=open_gop,
        )


def _has_leading_frames(pts: list[int], keyframes: list[int]) -> bool:
    """Whether a keyframe other than the first has later packets (decode order) with lower pts."""
    later_min: list[int | None] = [None] * (len(pts) + 1)
    for position in range(len(pts) - 1, -1, -1):
        following = later_min[position + 1]
        later_min[position] = pts[position] if following is None else min(following, pts[position])
    for position in keyframes:
        following = later_min[position + 1]
        if position > 0 and following is not None and following < pts[position]:
            return True
    return False


# How `backend: auto` picks a reader per stream (first matching row), as measured on the codec
# matrix in tests/unit/test_video_codecs.py. "Right frames" means the frame numbered i is the
# i-th picture in presentation order; where decord's are right, its pixels are the target (they
# are what keye-vl-utils feeds the model).
#
# | stream                                     | reader | why                                       |
# |--------------------------------------------|--------|-------------------------------------------|
# | MPEG-TS or MPEG-PS container               | pyav   | decord delivers wrong frames after seeks  |
# | AV1                                        | pyav   | decord cannot decode it                   |
# | open GOP (keyframes with leading frames,   | pyav   | decord seeks to such a keyframe and then  |
# | e.g. x265's default, x264 --open-gop)      |        | delivers frames 2 or more too late        |
# | rotated by 90 or 270 degrees               | pyav   | decord fails (malformed frame buffers)    |
# | more than 8 bits per sample (10-bit HEVC)  | decord | the two FFmpeg builds convert to RGB      |
# |                                            |        | differently (up to ~35-50 levels)         |
# | odd width/height with subsampled chroma    | decord | same: chroma upsampling differs (~50)     |
# | MPEG-4 part 2                              | decord | reported to differ by +-2 (IDCT)          |
# | anything else (H.264, 8-bit HEVC, VP8, VP9,| pyav   | bit-exact with decord, and faster         |
# | AV1, MJPEG, ...)                           |        |                                           |
#
# When the chosen reader cannot open the input or fails before its first frame, the other one
# is used (decord cannot decode AV1, for example: PyAV reads it).
_PYAV_CONTAINERS = ("mpegts", "mpeg")  # FFmpeg demuxer names of MPEG-TS and MPEG-PS
_DECORD_CANNOT_DECODE = frozenset({"av1", "libdav1d", "libaom-av1"})  # PyAV's AV1 decoders


def choose_backend(info: StreamInfo, rotation: int | None = None) -> tuple[str, str]:
    """("pyav" | "decord", reason) for a stream, by the table above.

    `rotation` (degrees) matters only when a row would pick decord; None skips that check
    (`auto_backend` reads the rotation only then, since it costs decoding a frame).
    """
    if info.container in _PYAV_CONTAINERS:
        return "pyav", f"decord misnumbers frames in {info.container} after seeking"
    if info.codec in _DECORD_CANNOT_DECODE:
        return "pyav", f"decord cannot decode {info.codec}"
    if info.open_gop:
        return "pyav", "open GOP: decord misnumbers frames after seeking to a keyframe"
    if info.bit_depth > 8:
        reason = f"{info.bit_depth}-bit samples ({info.pix_fmt}): decord's RGB conversion"
    elif info.odd_subsampled:
        reason = f"odd size with subsampled chroma ({info.pix_fmt}): decord's RGB conversion"
    elif info.codec == "mpeg4":
        reason = "MPEG-4 part 2: decord's IDCT"
    else:
        return "pyav", "decord's pixels (bit-exact) where decord can decode"
    if rotation is not None and rotation % 180 == 90:
        return "pyav", "rotated by a quarter turn: decord cannot"
    return "decord", reason


def auto_backend(reader: PyAVReader) -> tuple[str, str]:
    """`choose_backend` for an opened PyAV reader (decodes its first frame only if needed)."""
    backend, reason = choose_backend(reader.info)
    if backend == "decord":
        backend, reason = choose_backend(reader.info, reader.rotation)
    return backend, reason


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """RGB24 like decord: upright by the display matrix, scaled to the first frame's size."""
    quarter_turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
    image = frame.to_ndarray(format="rgb24")
    if quarter_turns:
        image = np.ascontiguousarray(np.rot90(image, quarter_turns))
    if size is not None and image.shape[:2] != size:
        height, width = size if quarter_turns % 2 == 0 else (size[1], size[0])
        image = frame.reformat(
            width=width, height=height, format="rgb24", interpolation="BILINEAR"
        ).to_ndarray()
        if quarter_turns:
            image = np.ascontiguousarray(np.rot90(image, quarter_turns))
    return image


def open_reader(backend: str, source: str | os.PathLike | bytes, *, threads: int):
    """A DecordReader or PyAVReader for `source` (raises the library's own errors)."""
    if backend == "decord":
        return DecordReader(source, threads=threads)
    if backend == "pyav":
        return PyAVReader(source, threads=threads)
    raise ValueError(f"unknown video backend {backend!r}")
