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
    """`num_frames` frames of one mosaic (`seed`), static, slowly fading or panning."""

    num_frames: int
    seed: int
    motion: Motion = "static"

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
