"""megatron-keye preprocess: every input format, planted bad records, byte-identical reruns,
resume after a stop, a crash mid-shard and a dying worker; every accepted record exactly once."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from megatron_keye import cli
from megatron_keye.data.media.synthetic_media import (
    Scene,
    image_bytes,
    synthetic_image,
    write_video,
)
from megatron_keye.data.shards import format as fmt
from megatron_keye.data.shards import writer
from megatron_keye.data.shards.format import read_index, read_record
from megatron_keye.data.shards.writer import InputSpec, PreprocessConfig, preprocess
from megatron_keye.data.text.tokenizer import KeyeTokenizer

LONG_TEXT = "the quick fox runs over the lazy dog " * 500


def _good_lines() -> list[dict]:
    """Records of every accepted format (media under the media root)."""
    return [
        {"conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                           {"from": "gpt", "value": "A mosaic of colours."}], "image": "img/a.png"},
        {"conversations": [{"from": "human", "value": "Compare <image> and <image>."},
                           {"from": "gpt", "value": "The first is brighter."},
                           {"from": "human", "value": "Why?"},
                           {"from": "gpt", "value": "More light cells."}],
         "images": ["img/a.png", "img/b.jpg"], "system": "Be brief."},
        {"messages": [{"role": "user", "content": "<video>What happens?"},
                      {"role": "assistant", "content": "Nothing moves."}], "videos": ["vid/v.mp4"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/b.jpg"},
                                                   {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": "Mostly red."}]},
        {"messages": [{"role": "system", "content": "You answer in one word."},
                      {"role": "user", "content": "Sky colour?"},
                      {"role": "assistant", "content": "Blue."}]},
        {"image": "img/a.png", "caption": "A grid of coloured squares."},
        {"images": ["img/b.jpg"], "caption": "Red and green tiles on black."},
        {"video": "vid/v.mp4", "caption": "A still mosaic for one second."},
        {"text": "Two foxes run across the field."},
        {"text": "An interleaved page <image> with a picture.", "images": ["img/a.png"]},
        {"prompt": "Which is right?", "chosen": "The left one.", "rejected": "Neither."},
        {"prompt": [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "Describe."}]}],
         "chosen": [{"role": "assistant", "content": "Tiles."}],
         "rejected": [{"role": "assistant", "content": "A cat."}], "images": ["img/a.png"]},
        {"messages": [{"role": "user", "content": "<image>Count the squares."},
                      {"role": "assistant", "content": "Twelve."}],
         "images": ["img/b.jpg"], "rejected_response": "Three.", "margin": 1.5},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
        {"conversations": [{"from": "human", "value": "<image>Good?"}], "images": ["img/a.png"],
         "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No."}},
    ]


# (line, reason) of every planted bad record; the text is the raw line.
BAD_LINES = [
    ("{this is not json", fmt.REJECT_BAD_JSON),
    ("[1, 2, 3]", fmt.REJECT_BAD_JSON),
    (json.dumps({"question": "no known fields"}), fmt.REJECT_UNKNOWN_FORMAT),
    (json.dumps({"image": "img/missing.png", "caption": "gone"}), fmt.REJECT_MISSING_MEDIA),
    (json.dumps({"image": "img/broken.png", "caption": "cut"}), fmt.REJECT_UNREADABLE_MEDIA),
    (json.dumps({"messages": [{"role": "user", "content": "<video>?"},
                              {"role": "assistant", "content": "x"}], "videos": ["vid/empty.mp4"]}),
     fmt.REJECT_UNREADABLE_MEDIA),
    (json.dumps({"messages": [{"role": "user", "content": "hello?"}]}), fmt.REJECT_NO_ASSISTANT),
    (json.dumps({"conversations": [{"from": "human", "value": "<image><image>"},
                                   {"from": "gpt", "value": "two"}], "image": "img/a.png"}),
     fmt.REJECT_MEDIA_MISMATCH),
    (json.dumps({"text": LONG_TEXT}), fmt.REJECT_TOO_MANY_TOKENS),
    (json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}), fmt.REJECT_NO_ASSISTANT),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), fmt.REJECT_BAD_FIELD),
    ('{"text": "caf\udce9"}', fmt.REJECT_BAD_JSON),  # not UTF-8 (written as a raw 0xE9 byte)
    (json.dumps({"messages": [{"role": "user", "content": "hi <|image_pad|>"},
                              {"role": "assistant", "content": "x"}]}), fmt.REJECT_SPECIAL_TOKEN),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    (root / "img").mkdir()
    (root / "vid").mkdir()
    (root / "img/a.png").write_bytes(image_bytes(synthetic_image(40, 56, seed=1)))
    (root / "img/b.jpg").write_bytes(image_bytes(synthetic_image(36, 30, seed=2), format="JPEG"))
    (root / "img/broken.png").write_bytes((root / "img/a.png").read_bytes()[:60])
    write_video(root / "vid/v.mp4", scenes=[Scene(num_frames=4, seed=3)], fps=4, height=32,
                width=48)
    (root / "vid/empty.mp4").write_bytes((root / "vid/v.mp4").read_bytes()[:200])  # truncated
    good = _good_lines()
    # interleave: the bad lines land between good ones; a blank line is skipped, not rejected
    lines: list[str] = []
    expected_rejects, expected_good = [], []
    bad = list(BAD_LINES)
    for index, record in enumerate(good * 2):
        lines.append(json.dumps(record))
        expected_good.append((len(lines), record))
        if index % 2 == 0 and bad:
            text, reason = bad.pop(0)
            lines.append(text)
            expected_rejects.append((len(lines), reason))
    lines.append("")
    chat = root / "chat.jsonl"
    chat.write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    # a second source, so records carry two source names
    plain = root / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({"text": f"Document number {i}."}) for i in range(5)))
    return {"root": root, "chat": chat, "plain": plain, "rejects": expected_rejects,
            "good": expected_good}


def _config(corpus: dict, out: Path, **overrides) -> PreprocessConfig:
    settings = dict(
        inputs=[InputSpec.parse(f"chat={corpus['chat']}"), InputSpec.parse(str(corpus["plain"]))],
        output_dir=out, name="train", media_root=corpus["root"], max_samples_per_shard=4,
        max_tokens=2500, workers=0, progress=False,
    )
    settings.update(overrides)
    return PreprocessConfig(**settings)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _records(directory: Path) -> list[fmt.Record]:
    """Every record of the corpus, in shard order, read with tarfile (webdataset's layout:
    contiguous members per key, key = name up to the first dot)."""
    index = read_index(directory / "train.index.json")
    records = []
    for shard in index.shards:
        samples: dict[str, dict] = {}
        with tarfile.open(directory / shard.file) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        assert len(samples) == shard.samples
        records.extend(read_record(sample) for sample in samples.values())
    return records


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    summary = preprocess(_config(corpus, out))
    assert summary.complete
    return out


def test_rejects_list_every_planted_bad_record(corpus, reference):
    rejects = [json.loads(line) for line in (reference / "train.rejects.jsonl").read_text()
               .splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == corpus["rejects"]
    assert all(r["file"] == str(corpus["chat"]) and r["detail"] for r in rejects)
    assert read_index(reference / "train.index.json").rejects == len(corpus["rejects"])


def test_every_accepted_record_appears_exactly_once(corpus, reference):
    records = _records(reference)
    chat = [r for r in records if r.source == "chat"]
    assert [r.origin_line for r in chat] == [line for line, _ in corpus["good"]]
    assert len({r.key for r in records}) == len(records)
    plain = [r for r in records if r.source == "plain"]
    assert [r.origin_line for r in plain] == [1, 2, 3, 4, 5]
    index = read_index(reference / "train.index.json")
    assert index.total_samples == len(records) == len(corpus["good"]) + 5
    assert all(shard.samples <= 4 for shard in index.shards) and len(index.shards) > 3
    assert index.sources["chat"].samples == len(chat)
    assert index.sources["chat"].text_tokens == sum(r.text_tokens for r in chat)
    kinds = {r.kind for r in chat}
    assert kinds == set(fmt.RECORD_KINDS)
    # content survives: tokens decode to the text, media bytes are the files
    tokenizer = KeyeTokenizer.default()
    for record in records:
        for message in (*record.messages, *record.chosen, *record.rejected):
            for segment in message.content:
                if isinstance(segment, fmt.TextSegment):
                    assert tokenizer.decode(list(segment.ids)) == segment.text
        for item in record.media:
            assert item.data == (corpus["root"] / item.path).read_bytes()
    by_line = {r.origin_line: r for r in chat}
    swift_pair = by_line[corpus["good"][12][0]]
    assert swift_pair.kind == fmt.KIND_PAIR and swift_pair.margin == 1.5
    assert [s.text for s in swift_pair.rejected[0].content] == ["Three."]
    implicit = by_line[corpus["good"][13][0]]
    assert [m.role for m in implicit.messages] == ["user"]
    assert implicit.chosen[0].content[0].text == "4"
    video = by_line[corpus["good"][2][0]].media[0]
    assert (video.type, video.width, video.height, video.num_frames) == ("video", 48, 32, 4)


def test_rerun_is_byte_identical_whatever_the_worker_count(corpus, reference, tmp_path):
    preprocess(_config(corpus, tmp_path / "again"))
    assert _files(tmp_path / "again") == _files(reference)
    preprocess(_config(corpus, tmp_path / "parallel", workers=2, chunk_lines=3))
    assert _files(tmp_path / "parallel") == _files(reference)


def test_stop_and_resume_gives_the_same_shards(corpus, reference, tmp_path):
    out = tmp_path / "stopped"
    first = preprocess(_config(corpus, out, stop_after_shards=2))
    assert not first.complete and len(first.shards) == 2
    assert not (out / "train.index.json").exists()
    second = preprocess(_config(corpus, out))
    assert second.complete and second.resumed_shards == 2
    assert _files(out) == _files(reference)
    # a complete output is not redone
    again = preprocess(_config(corpus, out))
    assert again.complete and sum(again.rejects.values()) == len(corpus["rejects"])
    assert _files(out) == _files(reference)


def test_crash_mid_shard_then_resume(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    real = fmt.record_to_sample
    calls = {"n": 0}

    def crash_on_the_tenth(record):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("simulated kill")
        return real(record)

    monkeypatch.setattr(fmt, "record_to_sample", crash_on_the_tenth)
    with pytest.raises(RuntimeError, match="simulated kill"):
        preprocess(_config(corpus, out))
    assert any(p.name.endswith(".tar.tmp") for p in out.iterdir())  # a half-written shard
    monkeypatch.setattr(fmt, "record_to_sample", real)
    # a corrupted finished shard is noticed by its size and rewritten
    with open(out / "train-000001.tar", "ab") as handle:
        handle.write(b"garbage")
    summary = preprocess(_config(corpus, out))
    assert summary.complete and summary.resumed_shards == 1
    assert _files(out) == _files(reference)


def _dying_convert_chunk(chunk, options):
    """Kills the worker process on the chunk holding input line 9 of chat.jsonl."""
    if any(line[0] == 0 and line[2] == 9 for line in chunk) and os.environ.get("KEYE_TEST_DIE"):
        os._exit(3)
    return _REAL_CONVERT_CHUNK(chunk, options)


_REAL_CONVERT_CHUNK = writer._convert_chunk


def test_dying_worker_then_resume(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "died"
    monkeypatch.setattr(writer, "_convert_chunk", _dying_convert_chunk)
    monkeypatch.setenv("KEYE_TEST_DIE", "1")
    with pytest.raises(Exception, match="terminated abruptly|BrokenProcessPool|broken"):
        preprocess(_config(corpus, out, workers=2, chunk_lines=2))
    monkeypatch.delenv("KEYE_TEST_DIE")
    summary = preprocess(_config(corpus, out, workers=2, chunk_lines=2))
    assert summary.complete
    assert _files(out) == _files(reference)


def test_changed_settings_refuse_to_resume(corpus, tmp_path):
    out = tmp_path / "partial"
    preprocess(_config(corpus, out, stop_after_shards=1))
    with pytest.raises(ValueError, match="--overwrite"):
        preprocess(_config(corpus, out, max_samples_per_shard=5))
    assert preprocess(_config(corpus, out, max_samples_per_shard=5, overwrite=True)).complete


def test_byte_limit_per_shard(corpus, tmp_path):
    out = tmp_path / "bytes"
    preprocess(_config(corpus, out, max_samples_per_shard=1000, max_bytes_per_shard=12_000))
    index = read_index(out / "train.index.json")
    assert len(index.shards) > 2
    assert index.total_samples == len(corpus["good"]) + 5


def test_cli_preprocess(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["preprocess", "--input", f"chat={corpus['chat']}", "--input",
                     str(corpus["plain"]), "--media-root", str(corpus["root"]), "--output-dir",
                     str(out), "--max-samples-per-shard", "4", "--max-tokens", "2500",
                     "--workers", "0", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"rejected: {len(BAD_LINES)}" in printed and "complete" in printed
    assert (out / "train.index.json").exists()
    assert cli.main(["preprocess", "--input", str(tmp_path / "nope.jsonl"),
                     "--output-dir", str(out / "x")]) == 2
