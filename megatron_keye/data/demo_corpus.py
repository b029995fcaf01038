"""A small synthetic multimodal corpus whose text can be learned from its pixels (the demo's data).

Every image is two colour bands (top, bottom) over a faint mosaic, and every video is a few
scenes, each tinted one colour; captions, answers and preferred responses name those colours, so
a model that trains on the corpus can lower its loss only by reading the vision input. The
corpus is written as JSONL in the input formats `megatron-keye preprocess` accepts (one file per
source: captions, videos, text, conversations, preference pairs) with media under `media/`.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_keye.data.media.synthetic_media import Scene, image_bytes, mosaic, write_video
from megatron_keye.data.text.synthetic_text import generate_documents

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 60), "blue": (30, 60, 220),
    "yellow": (230, 220, 40), "purple": (140, 40, 190), "orange": (240, 140, 20),
}
IMAGE_SIZES = ((56, 56), (56, 84), (84, 56), (84, 84))  # multiples of 28: whole 2x2 merges


@dataclass(kw_only=True, frozen=True)
class DemoCorpusConfig:
    """How many records of each kind; sizes stay small so the whole demo runs on 2 cores."""

    captions: int = 96  # image + caption records
    videos: int = 24  # short videos with a scene-by-scene description
    texts: int = 64  # plain-text documents
    conversations: int = 64  # image question/answer conversations
    pairs: int = 48  # preference pairs (chosen names the right colour, rejected a wrong one)
    seed: int = 7  # everything is drawn from this seed


@dataclass(kw_only=True, frozen=True)
class DemoCorpus:
    """What was written: the media root and one JSONL file per source name."""

    root: Path
    media_root: Path
    files: dict[str, Path]


def _banded_image(top: str, bottom: str, height: int, width: int, seed: int) -> np.ndarray:
    texture = mosaic(height, width, seed=seed, cell=14).astype(np.float32)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[: height // 2] = COLOURS[top]
    image[height // 2 :] = COLOURS[bottom]
    return (0.85 * image + 0.15 * texture).clip(0, 255).astype(np.uint8)


def _two_colours(rng: random.Random) -> tuple[str, str]:
    top, bottom = rng.sample(sorted(COLOURS), 2)
    return top, bottom


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def write_demo_corpus(root: str | Path, config: DemoCorpusConfig | None = None) -> DemoCorpus:
    """Write the corpus under `root` (created); returns where each source's JSONL lies."""
    config = config or DemoCorpusConfig()
    root = Path(root)
    media = root / "media"
    (media / "images").mkdir(parents=True, exist_ok=True)
    (media / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)

    def image(name: str) -> tuple[str, str, str]:
        top, bottom = _two_colours(rng)
        height, width = rng.choice(IMAGE_SIZES)
        path = f"images/{name}.png"
        pixels = _banded_image(top, bottom, height, width, seed=rng.randrange(1 << 30))
        (media / path).write_bytes(image_bytes(pixels))
        return path, top, bottom

    captions = []
    for i in range(config.captions):
        path, top, bottom = image(f"caption_{i:05d}")
        captions.append({"image": path, "caption": f"The top is {top} and the bottom is {bottom}."})

    videos = []
    for i in range(config.videos):
        names = rng.sample(sorted(COLOURS), rng.randint(2, 3))
        scenes = [Scene(num_frames=rng.randint(6, 10), seed=rng.randrange(1 << 30),
                        colour=COLOURS[n]) for n in names]
        path = f"videos/video_{i:05d}.mp4"
        write_video(media / path, scenes=scenes, fps=4, height=84, width=84)
        videos.append({
            "conversations": [
                {"from": "human", "value": "<video>\nWhich colours appear, in order?"},
                {"from": "gpt", "value": "First " + ", then ".join(names) + "."},
            ],
            "video": path,
        })

    texts = [{"text": doc} for doc in generate_documents(config.texts, seed=config.seed)]

    conversations = []
    for i in range(config.conversations):
        path, top, bottom = image(f"chat_{i:05d}")
        side, answer = rng.choice((("top", top), ("bottom", bottom)))
        conversations.append({
            "messages": [
                {"role": "user", "content": f"<image>What colour is the {side}?"},
                {"role": "assistant", "content": f"The {side} is {answer}."},
            ],
            "images": [path],
        })

    pairs = []
    for i in range(config.pairs):
        path, top, bottom = image(f"pair_{i:05d}")
        side, answer = rng.choice((("top", top), ("bottom", bottom)))
        wrong = rng.choice([c for c in sorted(COLOURS) if c not in (top, bottom)])
        pairs.append({
            "prompt": [{"role": "user", "content": f"<image>What colour is the {side}?"}],
            "chosen": [{"role": "assistant", "content": f"The {side} is {answer}."}],
            "rejected": [{"role": "assistant", "content": f"The {side} is {wrong}."}],
            "images": [path],
        })

    files = {
        "captions": _write_jsonl(root / "captions.jsonl", captions),
        "videos": _write_jsonl(root / "videos.jsonl", videos),
        "text": _write_jsonl(root / "text.jsonl", texts),
        "conversations": _write_jsonl(root / "conversations.jsonl", conversations),
        "pairs": _write_jsonl(root / "pairs.jsonl", pairs),
    }
    counts = {"captions": captions, "videos": videos, "text": texts,
              "conversations": conversations, "pairs": pairs}
    log.info("demo corpus: %s", ", ".join(f"{k} {len(v)}" for k, v in counts.items()))
    return DemoCorpus(root=root, media_root=media, files=files)
