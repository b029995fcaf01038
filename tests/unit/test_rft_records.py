"""RFT's accepted conversations: media paths written so the shard writer finds them, whatever
directory the prompts were read from (a relative prompts path used to leave every image record
rejected as missing media)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from megatron_keye.data.shards.writer import InputSpec, PreprocessConfig, preprocess
from megatron_keye.post_training.rft import conversation_record


def test_accepted_image_records_reach_the_shards_from_a_relative_prompts_path(tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    media = Path("prompts/media")
    media.mkdir(parents=True)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(media / "a.png")
    record = SimpleNamespace(text="How many bands?", source="count",
                             images=[str(media / "a.png")], videos=[])
    out = Path("runs/rft")
    out.mkdir(parents=True)
    row = conversation_record(record, "1", out_dir=out, replaced_reference=False)
    assert (out / row["images"][0]).resolve() == (tmp_path / media / "a.png").resolve()
    assert "videos" not in row and row["replaced_reference"] is False
    assert row["messages"][1] == {"role": "assistant", "content": "1"}
    (out / "accepted-count.jsonl").write_text(json.dumps(row) + "\n")

    preprocess(PreprocessConfig(inputs=[InputSpec(path=out / "accepted-count.jsonl",
                                                  source="count")],
                                output_dir=out / "shards", name="rft", progress=False))
    index = json.loads((out / "shards" / "rft.index.json").read_text())
    assert index["rejects"] == 0
    assert index["sources"]["count"]["samples"] == 1
    assert index["sources"]["count"]["images"] == 1
