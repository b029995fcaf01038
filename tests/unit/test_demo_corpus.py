"""The demo corpus: reproducible, in formats the preprocessor accepts, text tied to the pixels."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from megatron_keye.data.demo_corpus import COLOURS, DemoCorpusConfig, write_demo_corpus

SMALL = DemoCorpusConfig(captions=4, videos=2, texts=3, conversations=3, pairs=3, seed=3)


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = write_demo_corpus(tmp_path / "a", SMALL)
    b = write_demo_corpus(tmp_path / "b", SMALL)
    c = write_demo_corpus(tmp_path / "c", DemoCorpusConfig(**{**SMALL.__dict__, "seed": 4}))
    assert _tree(a.root) == _tree(b.root)
    assert _tree(a.root) != _tree(c.root)


def test_captions_name_the_colours_of_their_image(tmp_path):
    corpus = write_demo_corpus(tmp_path, SMALL)
    for line in corpus.files["captions"].read_text().splitlines():
        record = json.loads(line)
        pixels = np.asarray(Image.open(corpus.media_root / record["image"]).convert("RGB"))
        height = pixels.shape[0]
        top = pixels[: height // 4].reshape(-1, 3).mean(0)
        bottom = pixels[-height // 4 :].reshape(-1, 3).mean(0)
        nearest = [min(COLOURS, key=lambda n: np.abs(np.subtract(COLOURS[n], px)).sum())
                   for px in (top, bottom)]
        assert record["caption"] == f"The top is {nearest[0]} and the bottom is {nearest[1]}."


def test_preprocess_accepts_every_record(tmp_path):
    from megatron_keye.data.shards.writer import cli_main

    corpus = write_demo_corpus(tmp_path / "corpus", SMALL)
    args = [a for name, path in corpus.files.items() for a in ("--input", f"{name}={path}")]
    out = tmp_path / "shards"
    assert cli_main([*args, "--output-dir", str(out), "--media-root", str(corpus.media_root),
                     "--workers", "0", "--no-progress"]) == 0
    assert (out / "train.rejects.jsonl").read_text() == ""
    index = json.loads((out / "train.index.json").read_text())
    total = sum(len(p.read_text().splitlines()) for p in corpus.files.values())
    assert total == 4 + 2 + 3 + 3 + 3
    assert sum(s.get("samples", 0) for s in index.get("shards", [])) == total
