"""Images for the vision tower: size rounding, loading, resizing, normalization, patch rows.

An image becomes `(pixel_values, grid_thw)`: `pixel_values` is (N, 3, 14, 14) float32, one row per
14x14 patch in raster (t, gh, gw) order, and `grid_thw` is (t, gh, gw) in patch units with
N = t * gh * gw. Raster order is what the projector expects: its 2x2 merge
`rearrange("(t h p1 w p2) d -> (t h w) (p1 p2 d)", p1=2, p2=2)` reads the row index as
((t * h + h_i) * 2 + p1) * (2 * w) + (w_i * 2 + p2), i.e. gh = 2 * h_i + p1 and gw = 2 * w_i + p2,
so a merged token holds the four patches of one 28x28 pixel block (the vision RoPE also uses
`hid = p // gw`, `wid = p % gw` on these rows). Sizes are multiples of 28 = patch 14 x merge 2.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PATCH_SIZE = 14
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one LLM token covers 28x28 pixels
TOKEN_PIXELS = IMAGE_FACTOR * IMAGE_FACTOR  # 784
MAX_ASPECT_RATIO = 200


@dataclass(kw_only=True, frozen=True)
class ImageConfig:
    """Image preprocessing constants (keye-vl-utils 1.5.2 defaults: 4..20,480 tokens per image)."""

    min_pixels: int = 4 * TOKEN_PIXELS
    max_pixels: int = 20480 * TOKEN_PIXELS
    patch_size: int = PATCH_SIZE
    merge_size: int = MERGE_SIZE
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "merge_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ImageConfig.{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ImageConfig.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})"
            )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"ImageConfig.{name} needs 3 values (R, G, B)")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"ImageConfig.image_std must be positive, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Side multiple of every resized image: patch_size * merge_size."""
        return self.patch_size * self.merge_size


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = IMAGE_FACTOR,
    min_pixels: float = 4 * TOKEN_PIXELS,
    max_pixels: float = 20480 * TOKEN_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels].

    The released keye-vl-utils arithmetic, step for step (Python's round-half-even `round`, then
    floor/ceil after scaling by sqrt of the area ratio) so every size agrees with it. Inputs with an
    aspect ratio above 200 are refused, as the reference does.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: image size {height}x{width} (HxW) must be positive")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"smart_resize: image size {height}x{width} (HxW) has aspect ratio {ratio:.1f}, "
            f"above the limit of {MAX_ASPECT_RATIO}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def describe_source(source: object, key: str | None = None) -> str:
    """A short name for an input in error messages: the caller's key, the path, or the byte size."""
    if key is not None:
        return key
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<bytes len={len(source)}>"
    return f"<{type(source).__name__}>"


def load_image(source: object, *, key: str | None = None) -> torch.Tensor:
    """Decode an image into a uint8 RGB tensor [3, H, W].

    `source` may be a path, encoded bytes (as read from a shard), a PIL image, a uint8 numpy array
    [H, W, 3] or a uint8 tensor [3, H, W]. Undecodable input raises ValueError naming it.
    """
    from PIL import Image, UnidentifiedImageError

    name = describe_source(source, key)
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.dim() != 3 or source.shape[0] != 3:
            raise ValueError(
                f"image {name}: a tensor must be uint8 [3, H, W], got "
                f"{source.dtype} {tuple(source.shape)}"
            )
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ValueError(
                f"image {name}: an array must be uint8 [H, W, 3], got {source.dtype} {source.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(source)).permute(2, 0, 1)
    if isinstance(source, Image.Image):
        pil = source
    else:
        try:
            if isinstance(source, bytes | bytearray | memoryview):
                pil = Image.open(io.BytesIO(bytes(source)))
            elif isinstance(source, str | os.PathLike):
                pil = Image.open(os.fspath(source))
            else:
                raise ValueError(f"image {name}: unsupported input type {type(source).__name__}")
            pil.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"image {name}: cannot decode ({error})") from error
    array = np.asarray(pil.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def resize_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear antialiased resize of uint8 images [..., 3, H, W] (torch's uint8 kernel).

    Frames and images go through the same call the released SlowFast code uses
    (`F.interpolate(uint8, mode="bilinear", antialias=True)`), which rounds in fixed point.
    """
    if tuple(images.shape[-2:]) == (height, width):
        return images
    batch_shape = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:]) if images.dim() != 4 else images
    out = F.interpolate(flat, [height, width], mode="bilinear", antialias=True)
    return out.reshape(*batch_shape, *out.shape[-3:])


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a uint8 RGB image [3, H, W] the way the released pipeline does: PIL bicubic.

    keye-vl-utils' `fetch_image` resizes with `PIL.Image.resize` (bicubic for RGB) to the
    smart_resize size, and the processor then finds the image at its target size; images must see
    the same pixels here. (Video frames go through `resize_uint8`, as the processor does them.)
    """
    from PIL import Image

    if tuple(image.shape[-2:]) == (height, width):
        return image  # PIL returns an unchanged copy for its own size
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    resized = pil.resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def normalize(
    images: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std per channel."""
    scaled = images.to(torch.float32) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (scaled - mean_t) / std_t


def patchify(pixels: torch.Tensor, *, patch_size: int = PATCH_SIZE) -> tuple[torch.Tensor, tuple]:
    """Cut [T, 3, H, W] (or [3, H, W]) into rows (T * gh * gw, 3, p, p) in raster (t, gh, gw) order.

    Returns the rows and the grid (T, gh, gw) in patch units. H and W must be multiples of p.
    """
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(0)
    frames, channels, height, width = pixels.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patchify: size {height}x{width} is not a multiple of {patch_size}")
    gh, gw = height // patch_size, width // patch_size
    rows = pixels.reshape(frames, channels, gh, patch_size, gw, patch_size)
    rows = rows.permute(0, 2, 4, 1, 3, 5).reshape(
        frames * gh * gw, channels, patch_size, patch_size
    )
    return rows.contiguous(), (frames, gh, gw)


@dataclass(kw_only=True, frozen=True)
class ImageInputs:
    """One image ready for the vision tower: patch rows, grid (t, gh, gw) and LLM token count."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int


def preprocess_image(
    source: object, *, config: ImageConfig | None = None, key: str | None = None
) -> ImageInputs:
    """Load, smart-resize (PIL bicubic, as keye-vl-utils' fetch_image), normalize and patchify.

    The token count is gh * gw / merge_size^2: one LLM token per 2x2 patch block.
    """
    config = config or ImageConfig()
    image = load_image(source, key=key)
    _, height, width = image.shape
    try:
        target_h, target_w = smart_resize(
            height,
            width,
            factor=config.factor,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
        )
    except ValueError as error:
        raise ValueError(f"image {describe_source(source, key)}: {error}") from error
    resized = resize_image(image, target_h, target_w)
    pixels = normalize(resized, mean=config.image_mean, std=config.image_std)
    rows, grid = patchify(pixels, patch_size=config.patch_size)
    tokens = grid[0] * grid[1] * grid[2] // (config.merge_size**2)
    return ImageInputs(pixel_values=rows, grid_thw=grid, num_tokens=tokens)
