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

    Channel extremes are taken on uint8, the hue numerator in int16, and both table lookups use
    `index_select` with int32 indices (several times faster than advanced indexing). Callers with
    many frames pass chunks of a few frames so the temporaries stay in cache.
    """
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(
            f"rgb_to_hsv expects uint8 [..., 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    images = images.contiguous()
    red, green, blue = (images.select(-3, c) for c in range(3))
    value = torch.maximum(torch.maximum(red, green), blue)
    diff = value - torch.minimum(torch.minimum(red, green), blue)
    diff32 = diff.to(torch.int32)
    saturation_index = torch.add(diff32, value.to(torch.int32), alpha=256)
    red16, green16, blue16 = red.to(torch.int16), green.to(torch.int16), blue.to(torch.int16)
    diff16 = diff.to(torch.int16)
    num = torch.where(
        value == red,
        green16 - blue16,
        torch.where(value == green, blue16 - red16 + 2 * diff16, red16 - green16 + 4 * diff16),
    )
    hue_index = torch.add(diff32, num.to(torch.int32) + _NUM_OFFSET, alpha=256)
    hue = torch.index_select(_HUE_TABLE, 0, hue_index.flatten()).view(value.shape)
    saturation = torch.index_select(_SATURATION_TABLE, 0, saturation_index.flatten())
    return torch.stack((hue, saturation.view(value.shape), value), dim=-3)
