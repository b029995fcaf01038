"""RGB -> HSV on uint8 images, bit-exact with OpenCV's `cvtColor(COLOR_RGB2HSV)`.

OpenCV's 8-bit conversion is fixed point with a 12-bit shift (H in [0, 180)):
    V = max(R, G, B),  diff = V - min(R, G, B)
    S = (diff * sdiv[V] + 2048) >> 12,            sdiv[i] = round((255 << 12) / i), sdiv[0] = 0
    num = G - B           if V == R
          B - R + 2 diff  elif V == G
          R - G + 4 diff  otherwise
    H = (num * hdiv[diff] + 2048) >> 12 (+180 if negative),  hdiv[i] = round((180 << 12) / (6 i))
(`>>` is an arithmetic shift, i.e. floor division by 4096.) Here both products are precomputed into
small lookup tables, S over (V, diff) and H over (num, diff), so the conversion is a few vectorized
integer passes; no table entry is ever a rounding tie, so Python's round equals OpenCV's cvRound.
"""

from __future__ import annotations

import torch

_SHIFT = 12
_HALF = 1 << (_SHIFT - 1)
_NUM_OFFSET = 255  # num ranges over [-255, 5 * 255]


def _division_tables() -> tuple[list[int], list[int]]:
    sdiv = [0] + [round((255 << _SHIFT) / i) for i in range(1, 256)]
    hdiv = [0] + [round((180 << _SHIFT) / (6 * i)) for i in range(1, 256)]
    return sdiv, hdiv


def _build_lookup_tables() -> tuple[torch.Tensor, torch.Tensor]:
    sdiv, hdiv = _division_tables()
    diff = torch.arange(256, dtype=torch.int64).view(1, 256)
    saturation = (diff * torch.tensor(sdiv).view(256, 1) + _HALF) >> _SHIFT  # [V, diff]
    num = torch.arange(-_NUM_OFFSET, 5 * 255 + 1, dtype=torch.int64).view(-1, 1)
    hue = (num * torch.tensor(hdiv).view(1, 256) + _HALF) >> _SHIFT  # [num, diff]
    hue = torch.where(hue < 0, hue + 180, hue)
    # Entries that no real pixel reaches (e.g. num outside [-diff, 5 diff]) are clamped; unused.
    return saturation.clamp(0, 255).to(torch.uint8).flatten(), hue.clamp(0, 255).to(
        torch.uint8
    ).flatten()


_SATURATION_TABLE, _HUE_TABLE = _build_lookup_tables()


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [..., 3, H, W] -> uint8 HSV [..., 3, H, W] exactly as OpenCV (H in [0, 180)).

    Channel extremes are taken on uint8 and the hue numerator in int16, where OpenCV's three cases
    are chosen with all-ones bit masks (`torch.where` on these sizes is several times slower);
    both table lookups use `index_select` with int32 indices (faster than advanced indexing).
    Callers with many frames pass one frame (or a few) at a time so the temporaries stay in cache.
    """
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(
            f"rgb_to_hsv expects uint8 [..., 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    images = images.contiguous()
    red, green, blue = (images.select(-3, c) for c in range(3))
    value = torch.maximum(torch.maximum(red, green), blue)
    diff = value - torch.minimum(torch.minimum(red, green), blue)
    red16, green16, blue16 = red.to(torch.int16), green.to(torch.int16), blue.to(torch.int16)
    diff16 = diff.to(torch.int16)
    # OpenCV's case order: V == R first, then V == G, else V == B (masks are 0 or all ones).
    is_red = torch.eq(value, red).view(torch.uint8).to(torch.int16).neg_()
    is_green = torch.eq(value, green).view(torch.uint8).to(torch.int16).neg_()
    is_green.bitwise_and_(~is_red)
    is_blue = (is_red | is_green).bitwise_not_()
    num = (green16 - blue16).bitwise_and_(is_red)
    num.bitwise_or_((blue16 - red16).add_(diff16, alpha=2).bitwise_and_(is_green))
    num.bitwise_or_((red16 - green16).add_(diff16, alpha=4).bitwise_and_(is_blue))
    diff32 = diff.to(torch.int32)
    hue_index = num.add_(_NUM_OFFSET).to(torch.int32).mul_(256).add_(diff32)
    saturation_index = value.to(torch.int32).mul_(256).add_(diff32)
    hsv = torch.empty_like(images)
    hsv.select(-3, 0).copy_(
        torch.index_select(_HUE_TABLE, 0, hue_index.flatten()).view(value.shape)
    )
    hsv.select(-3, 1).copy_(
        torch.index_select(_SATURATION_TABLE, 0, saturation_index.flatten()).view(value.shape)
    )
    hsv.select(-3, 2).copy_(value)
    return hsv
