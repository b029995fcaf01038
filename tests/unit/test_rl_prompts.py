"""The RL prompt set's band-counting source: the image shows as many bands as the answer says,
in the colours the last hint names, and the same seed writes the same bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megatron_keye.data.demo_corpus import COLOURS
from megatron_keye.data.rl_prompts import RLPromptConfig, write_rl_prompts


def _bands(path) -> list[str]:
    """The colour nearest each pixel row's median, runs collapsed: the bands top to bottom."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), dtype=np.float32)
    rows = [names[int(np.argmin(((palette - np.median(row, axis=0)) ** 2).sum(1)))]
            for row in pixels]
    return [c for i, c in enumerate(rows) if i == 0 or rows[i - 1] != c]


def test_count_records_show_their_answer(tmp_path):
    config = RLPromptConfig(colour=0, arithmetic=3, count=12, max_operand=4)
    path = write_rl_prompts(tmp_path / "a", config)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    counts = [r for r in records if r["source"] == "count"]
    sums = [r for r in records if r["source"] == "arithmetic"]
    assert len(counts) == 12 and len(sums) == 3 and len(records) == 15
    assert {r["answer"] for r in counts} <= {"1", "2", "3", "4"}
    assert len({r["answer"] for r in counts}) > 1  # not one constant answer
    assert all(int(r["answer"]) <= 8 for r in sums)
    for r in counts:
        bands = _bands(path.parent / r["image"])
        assert len(bands) == int(r["answer"]), (r, bands)
        assert r["hints"][-1] == f"The bands are {', '.join(bands)}: {r['answer']}."
        assert r["mode"] == "no_think" and len(r["hints"]) == 5
    again = write_rl_prompts(tmp_path / "b", config)
    assert again.read_bytes() == path.read_bytes()
    for r in counts:
        assert (again.parent / r["image"]).read_bytes() == (path.parent / r["image"]).read_bytes()


def test_count_defaults_off_and_band_limit_is_checked(tmp_path):
    path = write_rl_prompts(tmp_path / "a", RLPromptConfig(colour=1, arithmetic=1))
    assert {json.loads(line)["source"] for line in path.read_text().splitlines()} == {
        "colour", "arithmetic"}
    with pytest.raises(ValueError, match="max_bands"):
        write_rl_prompts(tmp_path / "b", RLPromptConfig(count=1, max_bands=len(COLOURS) + 1))
