"""A loss curve as a PNG, drawn with Pillow (no plotting library needed on a fresh machine)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 400, 56


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def write_loss_plot(path: str | Path, steps: Sequence[int], losses: Sequence[float], *,
                    title: str) -> Path:
    """Draw loss against step (axes, 5 ticks each, the curve and its points) into `path`."""
    if len(steps) != len(losses) or not steps:
        raise ValueError(f"loss plot {title!r}: need matching, non-empty steps and losses")
    path = Path(path)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = MARGIN, MARGIN // 2 + 10, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    lo, hi = min(losses), max(losses)
    pad = (hi - lo) * 0.05 or 0.05 * abs(hi) or 1.0
    lo, hi = lo - pad, hi + pad
    first, last = min(steps), max(steps)
    span = (last - first) or 1

    def point(step: float, loss: float) -> tuple[float, float]:
        return (x0 + (step - first) / span * (x1 - x0), y1 - (loss - lo) / (hi - lo) * (y1 - y0))

    draw.rectangle([x0, y0, x1, y1], outline="black")
    for value in _ticks(lo, hi):
        y = point(first, value)[1]
        draw.line([x0 - 4, y, x0, y], fill="black")
        draw.text((4, y - 6), f"{value:.3f}", fill="black")
    for value in sorted({round(v) for v in _ticks(first, last)}):
        x = point(value, lo)[0]
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 8, y1 + 8), f"{value:.0f}", fill="black")
    draw.text((x0, 6), title, fill="black")
    draw.text(((x0 + x1) // 2 - 12, HEIGHT - 20), "step", fill="black")
    coords = [point(s, v) for s, v in zip(steps, losses, strict=True)]
    if len(coords) > 1:
        draw.line(coords, fill=(31, 119, 180), width=2)
    for x, y in coords:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
