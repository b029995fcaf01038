"""Input formats of the preprocessor, line by line: what each becomes (kind, turns, media order)."""

from __future__ import annotations

import json

import pytest

from megatron_keye.data.media.synthetic_media import image_bytes, synthetic_image
from megatron_keye.data.shards import format as fmt
from megatron_keye.data.shards import writer
from megatron_keye.data.shards.sources import RejectError, SourceOptions, convert_line
from megatron_keye.data.shards.writer import InputSpec, PreprocessConfig, preprocess
from megatron_keye.data.text.tokenizer import KeyeTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return KeyeTokenizer.default()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    for name, seed in (("a.png", 1), ("b.png", 2)):
        (root / name).write_bytes(image_bytes(synthetic_image(20, 24, seed=seed)))
    return root


def _convert(value, tokenizer, root) -> fmt.Record:
    return convert_line(json.dumps(value), key="k", file="f.jsonl", line_number=3,
                        options=SourceOptions(source="s", media_root=root), tokenizer=tokenizer)


def _shape(messages) -> list[tuple[str, list]]:
    """(role, ["text" or media path index]) of each message."""
    return [(m.role, [s.text if isinstance(s, fmt.TextSegment) else s.media for s in m.content])
            for m in messages]


def test_openai_parts_with_inline_paths_and_urls(tokenizer, root):
    record = _convert({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "text", "text": "and"},
                                     {"type": "image", "image": "a.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]}, tokenizer, root)
    assert _shape(record.messages) == [("user", [0, "and", 1]), ("assistant", ["two"])]
    assert [m.path for m in record.media] == ["b.png", "a.png"]
    assert [m.member for m in record.media] == ["0.png", "1.png"]


def test_media_without_tags_go_first_in_the_first_user_turn(tokenizer, root):
    record = _convert({"messages": [{"role": "system", "content": "sys"},
                                    {"role": "user", "content": "look"},
                                    {"role": "assistant", "content": "ok"}],
                       "images": ["a.png", "b.png"]}, tokenizer, root)
    assert _shape(record.messages) == [("system", ["sys"]), ("user", [0, 1, "look"]),
                                       ("assistant", ["ok"])]


def test_sharegpt_roles_system_and_tag_order(tokenizer, root):
    record = _convert({"system": "Be kind.", "conversations": [
        {"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "same"}],
        "images": ["b.png", "a.png"]}, tokenizer, root)
    assert _shape(record.messages) == [("system", ["Be kind."]), ("user", [0, " vs ", 1]),
                                       ("assistant", ["same"])]
    assert [m.path for m in record.media] == ["b.png", "a.png"]
    assert record.origin_line == 3 and record.source == "s"


@pytest.mark.parametrize("value", [
    {"prompt": "Q?", "chosen": "yes", "rejected": "no", "margin": 2},
    {"prompt": [{"role": "user", "content": "Q?"}],
     "chosen": [{"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "assistant", "content": "no"}], "margin": 2},
    {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}],
     "margin": 2},
    {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
     "rejected_response": "no", "margin": 2},
    {"conversations": [{"from": "human", "value": "Q?"}],
     "chosen": {"from": "gpt", "value": "yes"}, "rejected": {"from": "gpt", "value": "no"},
     "margin": 2},
], ids=["trl-strings", "trl-messages", "trl-implicit", "swift", "sharegpt"])
def test_every_pair_format_gives_the_same_pair(tokenizer, root, value):
    record = _convert(value, tokenizer, root)
    assert record.kind == fmt.KIND_PAIR and record.margin == 2.0
    assert _shape(record.messages) == [("user", ["Q?"])]
    assert _shape(record.chosen) == [("assistant", ["yes"])]
    assert _shape(record.rejected) == [("assistant", ["no"])]


def test_pair_with_a_shared_image_keeps_it_in_the_prompt(tokenizer, root):
    record = _convert({"chosen": [{"role": "user", "content": "<image>Q"},
                                  {"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "user", "content": "<image>Q"},
                                    {"role": "assistant", "content": "b"}],
                       "images": ["a.png"]}, tokenizer, root)
    assert _shape(record.messages) == [("user", [0, "Q"])] and len(record.media) == 1


@pytest.mark.parametrize(("value", "reason"), [
    ({"prompt": "q", "chosen": "a"}, fmt.REJECT_UNKNOWN_FORMAT),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     fmt.REJECT_BAD_FIELD),
    ({"messages": [{"role": "user", "content": "q"}], "rejected_response": "b"},
     fmt.REJECT_NO_ASSISTANT),
    ({"text": "x", "margin": 1}, fmt.REJECT_BAD_FIELD),
    ({"images": ["a.png", "b.png"], "caption": "two <image>"}, fmt.REJECT_MEDIA_MISMATCH),
    ({"caption": ""}, fmt.REJECT_BAD_FIELD),
    ({"image": 5, "caption": "x"}, fmt.REJECT_BAD_FIELD),
])
def test_bad_lines(tokenizer, root, value, reason):
    with pytest.raises(RejectError) as caught:
        _convert(value, tokenizer, root)
    assert caught.value.reason == reason and caught.value.detail


def test_an_unexpected_error_in_conversion_is_a_reject_not_a_stop(root, tmp_path, monkeypatch):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(6)) + "\n")
    real = writer.convert_line

    def flaky(line, **kwargs):
        if kwargs["line_number"] == 4:
            raise ZeroDivisionError("boom")
        return real(line, **kwargs)

    monkeypatch.setattr(writer, "convert_line", flaky)
    summary = preprocess(PreprocessConfig(inputs=[InputSpec.parse(str(corpus))],
                                          output_dir=tmp_path / "out", progress=False))
    assert summary.complete and sum(s.samples for s in summary.shards) == 5
    rejects = (tmp_path / "out" / "train.rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 1
    reject = json.loads(rejects[0])
    assert (reject["line"], reject["reason"]) == (4, fmt.REJECT_INTERNAL)
    assert "ZeroDivisionError: boom" in reject["detail"]
