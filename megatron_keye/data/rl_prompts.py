"""A small verifiable prompt set for the RL (GSPO) and RFT stages on CPU.

Three sources, written as one JSONL in the format `rl.prompts` and `megatron-keye rft` read:
- `colour`: an image of two colour bands (the demo corpus's `_banded_image`) and "What colour
  is the top/bottom?"; the answer is the colour word (verifier `exact`); hints name the
  concept, the strategy, the candidate colours, the first step and the full answer.
- `arithmetic`: "What is a + b?" on small numbers; the answer is the sum (verifier `numeric`,
  which `exact` also accepts), with hints up to the full solution.
- `count`: an image of 1..`max_bands` horizontal colour bands (the same texture as the demo
  corpus's images) and "How many colour bands does the picture show?"; the answer is the count
  (a number: `numeric`, `numeric_close` and `exact` all apply), hints up to the colours in order.
Every record has `prompt`, `answer`, `mode` (no_think), `hints` (L1..L5) and `source`. The same
seed gives byte-identical files (images included).

    python -c "from megatron_keye.data.rl_prompts import write_rl_prompts; write_rl_prompts('out')"
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_keye.data.demo_corpus import COLOURS, IMAGE_SIZES, _banded_image
from megatron_keye.data.media.synthetic_media import image_bytes, mosaic


@dataclass(kw_only=True, frozen=True)
class RLPromptConfig:
    """How many prompts of each source."""

    colour: int = 32  # image colour questions
    arithmetic: int = 32  # text sums
    max_operand: int = 9  # operands drawn from 0..max_operand
    count: int = 0  # image band-counting questions
    max_bands: int = 4  # a counting image has 1..max_bands bands (at most len(COLOURS))
    seed: int = 11


def colour_record(rng: random.Random, media: Path, name: str) -> dict:
    top, bottom = rng.sample(sorted(COLOURS), 2)
    height, width = rng.choice(IMAGE_SIZES)
    path = f"images/{name}.png"
    pixels = _banded_image(top, bottom, height, width, seed=rng.randrange(1 << 30))
    (media / path).write_bytes(image_bytes(pixels))
    side, answer = rng.choice((("top", top), ("bottom", bottom)))
    return {
        "prompt": f"What colour is the {side}? Answer with one word.",
        "answer": answer,
        "image": f"media/{path}",
        "mode": "no_think",
        "source": "colour",
        "hints": [
            "The image is two horizontal bands of colour.",
            f"Look only at the {side} half of the image.",
            "The colours are " + ", ".join(sorted(COLOURS)) + ".",
            f"First find the {side} band, then name the colour that fills it.",
            f"The {side} is {answer}.",
        ],
    }


def arithmetic_record(rng: random.Random, max_operand: int) -> dict:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return {
        "prompt": f"What is {a} + {b}? Answer with the number only.",
        "answer": str(a + b),
        "mode": "no_think",
        "source": "arithmetic",
        "hints": [
            "This is an addition of two whole numbers.",
            f"Count on from {max(a, b)}.",
            "a + b = b + a.",
            f"{max(a, b)} + 1 = {max(a, b) + 1}.",
            f"{a} + {b} = {a + b}.",
        ],
    }


def striped_image(colours: list[str], height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: one horizontal band per colour, top to bottom, over a faint mosaic."""
    texture = mosaic(height, width, seed=seed, cell=14).astype(np.float32)
    image = np.empty((height, width, 3), dtype=np.float32)
    edges = [round(i * height / len(colours)) for i in range(len(colours) + 1)]
    for colour, start, stop in zip(colours, edges, edges[1:], strict=False):
        image[start:stop] = COLOURS[colour]
    return (0.85 * image + 0.15 * texture).clip(0, 255).astype(np.uint8)


def count_record(rng: random.Random, media: Path, name: str, max_bands: int) -> dict:
    bands = rng.randint(1, max_bands)
    colours = rng.sample(sorted(COLOURS), bands)
    height, width = rng.choice(IMAGE_SIZES)
    path = f"images/{name}.png"
    pixels = striped_image(colours, height, width, seed=rng.randrange(1 << 30))
    (media / path).write_bytes(image_bytes(pixels))
    return {
        "prompt": "How many colour bands does the picture show? Answer with the number only.",
        "answer": str(bands),
        "image": f"media/{path}",
        "mode": "no_think",
        "source": "count",
        "hints": [
            "A band is a horizontal stripe of one colour.",
            "Count the stripes from the top of the image to the bottom.",
            f"There are between 1 and {max_bands} bands.",
            f"The top band is {colours[0]}.",
            f"The bands are {', '.join(colours)}: {bands}.",
        ],
    }


def write_rl_prompts(root: str | Path, config: RLPromptConfig | None = None) -> Path:
    """Write `root/prompts.jsonl` (and its images under `root/media/images`); returns its path."""
    config = config or RLPromptConfig()
    root = Path(root)
    media = root / "media"
    (media / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    records = [colour_record(rng, media, f"rl_{i:05d}") for i in range(config.colour)]
    records += [arithmetic_record(rng, config.max_operand) for _ in range(config.arithmetic)]
    if not 1 <= config.max_bands <= len(COLOURS):
        raise ValueError(f"rl prompts: max_bands must be in 1..{len(COLOURS)}, got "
                         f"{config.max_bands}")
    records += [count_record(rng, media, f"rl_count_{i:05d}", config.max_bands)
                for i in range(config.count)]
    rng.shuffle(records)
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_keye.data.rl_prompts OUT_DIR [--colour N] [--arithmetic N] [--count N]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_keye.data.rl_prompts")
    parser.add_argument("out")
    parser.add_argument("--colour", type=int, default=32)
    parser.add_argument("--arithmetic", type=int, default=32)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    path = write_rl_prompts(args.out, RLPromptConfig(
        colour=args.colour, arithmetic=args.arithmetic, count=args.count,
        max_operand=args.max_operand, seed=args.seed))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
