"""Synthetic videos and images with known content, written to real files (mp4 via PyAV, PNG/JPEG).

A video is a list of scenes. Each scene shows its own random mosaic of coloured and black cells
(seeded, so reproducible); consecutive scenes have unrelated mosaics, so every scene start is an
abrupt cut that the SlowFast comparison sees as a new slow frame. Inside a scene the picture is
either static or drifts slowly in brightness (not enough to change the HSV patch directions), or
pans (for benchmark realism; panning creates new slow frames over time). Tests use the scene starts
as the expected slow frames; the benchmark and demo corpus use longer clips.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Motion = Literal["static", "fade", "pan"]


@dataclass(kw_only=True, frozen=True)
class Scene:
    """`num_frames` frames of one mosaic (`seed`), static, slowly fading or panning; with
    `colour`, the mosaic is tinted towards that RGB colour (a scene a caption can name)."""

    num_frames: int
    seed: int
    motion: Motion = "static"
    colour: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"Scene.num_frames must be >= 1, got {self.num_frames}")
        if self.motion not in ("static", "fade", "pan"):
            raise ValueError(f"Scene.motion must be static, fade or pan, got {self.motion!r}")


@dataclass(kw_only=True, frozen=True)
class SyntheticVideo:
    """What was written: where, its geometry and the frame number where each scene starts."""

    path: Path
    fps: int
    height: int
    width: int
    num_frames: int
    scene_starts: tuple[int, ...] = field(default_factory=tuple)


def mosaic(
    height: int, width: int, *, seed: int, cell: int = 16, black_share: float = 0.4
) -> np.ndarray:
    """uint8 [H, W, 3]: cells of `cell` pixels, each black or a random vivid colour."""
    rng = np.random.default_rng(seed)
    rows, cols = -(-height // cell), -(-width // cell)
    colours = rng.integers(40, 256, size=(rows, cols, 3), dtype=np.int64)
    # push one channel down per cell so colours are saturated (hues spread over the circle)
    weak = rng.integers(0, 3, size=(rows, cols))
    np.put_along_axis(colours, weak[..., None], rng.integers(0, 40, size=(rows, cols, 1)), axis=2)
    colours[rng.random((rows, cols)) < black_share] = 0
    image = np.repeat(np.repeat(colours.astype(np.uint8), cell, axis=0), cell, axis=1)
    return np.ascontiguousarray(image[:height, :width])


def scene_frame(scene: Scene, index: int, *, height: int, width: int) -> np.ndarray:
    """Frame `index` (0-based within the scene) of a scene as uint8 [H, W, 3]."""
    if scene.colour is not None:
        plain = Scene(num_frames=scene.num_frames, seed=scene.seed, motion=scene.motion)
        texture = scene_frame(plain, index, height=height, width=width).astype(np.float32)
        tinted = 0.8 * np.asarray(scene.colour, dtype=np.float32) + 0.2 * texture
        return tinted.clip(0, 255).astype(np.uint8)
    if scene.motion == "pan":
        base = mosaic(height, width + scene.num_frames * 2, seed=scene.seed)
        return np.ascontiguousarray(base[:, index * 2 : index * 2 + width])
    base = mosaic(height, width, seed=scene.seed)
    if scene.motion == "fade":
        scale = 1.0 - 0.15 * index / max(scene.num_frames - 1, 1)
        return (base.astype(np.float32) * scale).astype(np.uint8)
    return base


def write_video(
    path: str | os.PathLike,
    *,
    scenes: list[Scene],
    fps: int = 4,
    height: int = 224,
    width: int = 320,
    codec: str = "libx264",
    crf: int = 18,
    preset: str = "veryfast",
    gop: int | None = None,
    faststart: bool = False,
    colorspace: int | None = None,
    color_range: int | None = None,
) -> SyntheticVideo:
    """Encode the scenes into a yuv420p video file; returns the scene start frames.

    `colorspace` / `color_range` tag the stream (FFmpeg enum values, e.g. 1 = BT.709, 2 = full
    range) to check that every decoder converts tagged video to RGB the same way.
    """
    import av

    if height % 2 or width % 2:
        raise ValueError(f"write_video: {height}x{width} must be even for yuv420p")
    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}
    starts = []
    total = 0
    with av.open(str(path), mode="w", options=options) as container:
        codec_options = {"crf": str(crf), "preset": preset} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=codec_options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        if color_range is not None:
            stream.codec_context.color_range = color_range
        if codec != "libx264":
            stream.codec_context.bit_rate = 4_000_000
        for scene in scenes:
            starts.append(total)
            for index in range(scene.num_frames):
                image = scene_frame(scene, index, height=height, width=width)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(stream.encode(frame))
                total += 1
        container.mux(stream.encode(None))
    return SyntheticVideo(
        path=path, fps=fps, height=height, width=width, num_frames=total, scene_starts=tuple(starts)
    )


def write_empty_video(path: str | os.PathLike, *, height: int = 64, width: int = 64) -> Path:
    """An mp4 with a video stream but no frames."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.mux(stream.encode(None))
    return path


def benchmark_scenes(*, seconds: int = 60, fps: int = 30) -> list[Scene]:
    """A minute of mixed content: scene cuts every 2-6 s, static, fading and panning stretches."""
    rng = np.random.default_rng(2024)
    scenes = []
    remaining = seconds * fps
    motions: tuple[Motion, ...] = ("static", "fade", "pan")
    while remaining > 0:
        length = min(remaining, int(rng.integers(2, 7)) * fps)
        scenes.append(
            Scene(
                num_frames=length, seed=int(rng.integers(1 << 30)), motion=motions[len(scenes) % 3]
            )
        )
        remaining -= length
    return scenes


def synthetic_image(height: int, width: int, *, seed: int) -> np.ndarray:
    """A reproducible uint8 RGB image [H, W, 3]: a mosaic with a smooth gradient over it."""
    image = mosaic(height, width, seed=seed, cell=max(4, min(height, width) // 8)).astype(np.int32)
    ramp = (np.arange(width, dtype=np.int32) * 60 // max(width - 1, 1))[None, :, None]
    return np.clip(image + ramp, 0, 255).astype(np.uint8)


def image_bytes(image: np.ndarray, *, format: str = "PNG") -> bytes:
    """Encode an image array as PNG or JPEG bytes (as stored in a shard)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format)
    return buffer.getvalue()


# ---- stamped clips in many codecs (which source frame did a decoder deliver?) -------------------

STAMP_BITS = 8  # frame numbers 0..255
STAMP_BLOCK = 8  # pixels per stamp block side; the stamp fills the top 2 block rows of 8 blocks


def stamped_frame(index: int, *, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: frame `index`'s number as a binary stamp over a moving colour pattern.

    The top-left 64 x 16 pixels hold the stamp: block row 0 has bit b of `index` in block b
    (light = 1, dark = 0), block row 1 its complement, blocks of 8 x 8 pixels, so it survives
    lossy coding and chroma subsampling. The rest is a smooth colour field that drifts with
    `index`, so decoders' colour conversions and interpolations show in the pixels.
    """
    if width < STAMP_BITS * STAMP_BLOCK or height < 3 * STAMP_BLOCK:
        raise ValueError(f"stamped_frame: {height}x{width} is too small for the stamp")
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    phase = index * 0.15
    red = 128 + 90 * np.sin(cols / 9.0 + phase)
    green = 128 + 90 * np.sin(rows / 7.0 - phase * 0.7)
    blue = 128 + 90 * np.sin((rows + cols) / 11.0 + phase * 1.3)
    image = np.stack(np.broadcast_arrays(red, green, blue), axis=-1).clip(0, 255).astype(np.uint8)
    block = STAMP_BLOCK
    for bit in range(STAMP_BITS):
        value = (index >> bit) & 1
        columns = slice(bit * block, (bit + 1) * block)
        image[0:block, columns] = 235 if value else 20
        image[block : 2 * block, columns] = 20 if value else 235
    return image


def read_stamp(image: np.ndarray) -> int | None:
    """The frame number stamped by `stamped_frame` (uint8 [H, W, 3], upright), or None if unreadable.

    Each block is read at its 4 x 4 centre; a bit counts only when its complement agrees.
    """
    luma = np.asarray(image, dtype=np.float32).mean(axis=-1)
    block, inner = STAMP_BLOCK, STAMP_BLOCK // 4
    number = 0
    for bit in range(STAMP_BITS):
        left = bit * block + inner
        top = luma[inner : block - inner, left : left + block - 2 * inner].mean()
        bottom = luma[block + inner : 2 * block - inner, left : left + block - 2 * inner].mean()
        if (top > 128) == (bottom > 128):
            return None
        number |= int(top > 128) << bit
    return number


@dataclass(kw_only=True, frozen=True)
class ClipSpec:
    """One clip of the codec matrix: codec, container, pixel format, timing and geometry.

    `frame_times` (seconds, increasing) gives variable frame rate; otherwise frames are 1 / fps
    apart. `start` shifts every timestamp (a stream that does not begin at 0).
    """

    name: str
    codec: str  # a PyAV encoder name
    container: str = "mp4"  # file extension; the muxer follows from it
    pix_fmt: str = "yuv420p"
    width: int = 64
    height: int = 48
    num_frames: int = 40
    fps: float | tuple[int, int] = 24
    frame_times: tuple[float, ...] | None = None
    start: float = 0.0
    rotation: int = 0  # display rotation in degrees (counter-clockwise, as FFmpeg stores it)
    b_frames: bool = False
    gop: int = 12
    options: tuple[tuple[str, str], ...] = ()


def phone_vfr_times(num_frames: int, *, seed: int = 7) -> tuple[float, ...]:
    """Frame times like a phone camera's: ~30 fps with jitter and a few slow stretches."""
    rng = np.random.default_rng(seed)
    times, now = [], 0.0
    for index in range(num_frames):
        times.append(round(now, 4))
        step = 1 / 30 + rng.uniform(-0.004, 0.004)
        if index % 13 in (5, 6, 7):  # low light: the camera drops to ~12 fps for a moment
            step = 1 / 12
        now += step
    return tuple(times)


def codec_matrix() -> list[ClipSpec]:
    """The clips of the codec matrix (tests and the backend measurements use these)."""
    x264 = (("preset", "veryfast"), ("crf", "20"))
    x265 = (("preset", "ultrafast"), ("crf", "22"), ("x265-params", "log-level=error"))  # open GOP
    x265_closed = (*x265[:2], ("x265-params", "log-level=error:open-gop=0"))
    vpx = (("deadline", "realtime"), ("cpu-used", "8"), ("crf", "20"), ("b", "1M"))
    return [
        ClipSpec(name="h264", codec="libx264", fps=(30000, 1001), options=x264),
        ClipSpec(name="h264_bframes", codec="libx264", fps=24, b_frames=True, options=x264),
        ClipSpec(
            name="h264_vfr",
            codec="libx264",
            frame_times=phone_vfr_times(40),
            b_frames=True,
            options=x264,
        ),
        ClipSpec(name="h264_offset", codec="libx264", fps=24, start=1.5, options=x264),
        ClipSpec(name="h264_rot90", codec="libx264", rotation=90, options=x264),
        ClipSpec(name="h264_rot180", codec="libx264", rotation=180, options=x264),
        ClipSpec(name="h264_66x50", codec="libx264", width=66, height=50, options=x264),
        ClipSpec(name="hevc", codec="libx265", b_frames=True, options=x265),
        ClipSpec(
            name="hevc_10bit", codec="libx265", pix_fmt="yuv420p10le", b_frames=True, options=x265
        ),
        ClipSpec(
            name="hevc_10bit_closed_gop",
            codec="libx265",
            pix_fmt="yuv420p10le",
            b_frames=True,
            options=x265_closed,
        ),
        ClipSpec(
            name="h264_open_gop",
            codec="libx264",
            b_frames=True,
            options=(*x264, ("x264-params", "open-gop=1")),
        ),
        ClipSpec(name="vp8", codec="libvpx", container="webm", options=vpx),
        ClipSpec(name="vp9", codec="libvpx-vp9", container="webm", options=vpx),
        ClipSpec(
            name="vp9_odd", codec="libvpx-vp9", container="webm", width=65, height=49, options=vpx
        ),
        ClipSpec(
            name="av1",
            codec="libsvtav1",
            container="mp4",
            width=64,
            height=64,
            options=(("preset", "12"), ("crf", "30")),
        ),
        ClipSpec(name="mpeg4", codec="mpeg4"),
        ClipSpec(name="mpeg4_odd", codec="mpeg4", width=65, height=49),
        ClipSpec(name="mjpeg", codec="mjpeg", container="avi", pix_fmt="yuvj420p"),
        ClipSpec(
            name="mjpeg_odd",
            codec="mjpeg",
            container="avi",
            pix_fmt="yuvj420p",
            width=65,
            height=49,
        ),
        ClipSpec(name="h264_10bit", codec="libx264", pix_fmt="yuv420p10le", options=x264),
        ClipSpec(name="mpeg2_ts", codec="mpeg2video", container="ts"),
        ClipSpec(
            name="mpegts_bframes", codec="libx264", container="ts", b_frames=True, options=x264
        ),
    ]


def write_stamped_clip(path: str | os.PathLike, spec: ClipSpec) -> Path:
    """Encode `spec.num_frames` stamped frames (`stamped_frame`) as `spec` says."""
    from fractions import Fraction

    import av

    path = Path(path)
    rate = Fraction(*spec.fps) if isinstance(spec.fps, tuple) else Fraction(spec.fps)
    if spec.frame_times is not None:
        times = [Fraction(t).limit_denominator(90000) for t in spec.frame_times]
    else:
        times = [index / rate for index in range(spec.num_frames)]
    # CFR clips count in frame periods (some encoders need a small time base denominator).
    time_base = Fraction(1, 90000) if spec.frame_times is not None else 1 / rate
    options = dict(spec.options)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(spec.codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
        codec = stream.codec_context
        codec.time_base = time_base
        stream.time_base = time_base
        codec.gop_size = spec.gop
        codec.max_b_frames = 2 if spec.b_frames else 0
        if spec.codec in ("mpeg4", "libvpx", "libvpx-vp9"):
            codec.bit_rate = 2_000_000
        if spec.rotation:
            stream.set_display_rotation(spec.rotation)
        for index, when in enumerate(times[: spec.num_frames]):
            image = stamped_frame(index, height=spec.height, width=spec.width)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = round((when + Fraction(spec.start).limit_denominator(1000)) / time_base)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
