"""Small shard corpora for the loader tests, written by `megatron-keye preprocess`'s writer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_keye.data.media.synthetic_media import (
    Scene,
    image_bytes,
    synthetic_image,
    write_video,
)
from megatron_keye.data.shards.writer import InputSpec, PreprocessConfig, preprocess

WORDS = [
    "red",
    "green",
    "blue",
    "fox",
    "dog",
    "runs",
    "over",
    "the",
    "lazy",
    "field",
    "bright",
    "tile",
    "mosaic",
    "square",
    "light",
    "dark",
    "small",
    "large",
    "quick",
    "slow",
    "left",
    "right",
]


def write_corpus(directory: Path, name: str, lines: list[dict], *, per_shard: int) -> Path:
    """Preprocess JSONL `lines` into shards; returns the index path."""
    directory.mkdir(parents=True, exist_ok=True)
    jsonl = directory / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    preprocess(
        PreprocessConfig(
            inputs=[InputSpec(path=jsonl, source=name)],
            output_dir=directory / "shards",
            name=name,
            media_root=directory,
            max_samples_per_shard=per_shard,
            progress=False,
        )
    )
    return directory / "shards" / f"{name}.index.json"


def text_corpus(
    directory: Path,
    name: str,
    count: int,
    *,
    per_shard: int = 7,
    seed: int = 0,
    min_words: int = 3,
    max_words: int = 30,
) -> Path:
    """`count` plain documents of varying length; document i starts with its tag."""
    rng = random.Random(seed)
    lines = [
        {
            "text": f"{name} {i} "
            + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        }
        for i in range(count)
    ]
    return write_corpus(Path(directory), name, lines, per_shard=per_shard)


def media_corpus(
    directory: Path,
    name: str,
    *,
    images: int,
    videos: int,
    per_shard: int = 3,
    conversations: bool = True,
) -> Path:
    """Captioned images and conversations about short videos (tiny sizes)."""
    directory = Path(directory)
    (directory / "media").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        path = directory / "media" / f"{name}{i}.png"
        path.write_bytes(image_bytes(synthetic_image(56 + 28 * (i % 3), 84, seed=i)))
        lines.append({"image": f"media/{path.name}", "caption": f"tiles number {i} bright"})
    for i in range(videos):
        path = directory / "media" / f"{name}v{i}.mp4"
        write_video(
            path,
            scenes=[Scene(num_frames=4, seed=i), Scene(num_frames=4, seed=i + 50)],
            fps=4,
            height=56,
            width=56,
        )
        if conversations:
            lines.append(
                {
                    "messages": [
                        {"role": "user", "content": "<video>What happens?"},
                        {"role": "assistant", "content": f"scene cut {i}"},
                    ],
                    "videos": [f"media/{path.name}"],
                }
            )
        else:
            lines.append({"video": f"media/{path.name}", "caption": f"clip {i}"})
    return write_corpus(directory, name, lines, per_shard=per_shard)
