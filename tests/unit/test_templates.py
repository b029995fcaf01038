"""Rendering shard records: ChatML equal to the reference template, assistant-only targets,
pairs, think suffixes, plain text, caption tasks deterministic per seed, placeholder expansion."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from megatron_keye.data.media.synthetic_media import image_bytes, synthetic_image
from megatron_keye.data.shards import format as fmt
from megatron_keye.data.shards.sources import SourceOptions, convert_line
from megatron_keye.data.text.caption_augment import AUGMENTATIONS, CaptionAugmentation
from megatron_keye.data.text.templates import (
    MediaRef,
    TemplateOptions,
    expand_rendered,
    render_chat,
    render_record,
)
from megatron_keye.data.text.tokenizer import KeyeTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> KeyeTokenizer:
    return KeyeTokenizer.default()


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    for seed in range(4):
        (root / f"{seed}.png").write_bytes(image_bytes(synthetic_image(30, 44, seed=seed)))
    return root


def _record(value: dict, tokenizer, media_root: Path, key: str = "k") -> fmt.Record:
    record = convert_line(json.dumps(value), key=key, file="x.jsonl", line_number=1,
                          options=SourceOptions(source="s", media_root=media_root),
                          tokenizer=tokenizer)
    # through the shard encoding and back, as the loader gets it
    return fmt.read_record(fmt.record_to_sample(record))


CONVERSATION = {
    "messages": [
        {"role": "user", "content": "<image>What colour is the first square?"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "And <image> the second one?"},
        {"role": "assistant", "content": "Green, with a dark border."},
    ],
    "images": ["0.png", "1.png"],
}


def _spans(decoded_tokens: list[str]) -> list[tuple[int, int]]:
    """[start, end] token spans of assistant replies incl. their <|im_end|>."""
    spans, inside, start = [], False, 0
    for i, token in enumerate(decoded_tokens):
        if token == "<|im_start|>" and decoded_tokens[i + 1 : i + 3] == ["assistant", "Ċ"]:
            inside, start = True, i + 3
        elif token == "<|im_end|>" and inside:
            spans.append((start, i))
            inside = False
    return spans


def test_conversation_matches_the_chat_template(tokenizer, media_root):
    record = _record(CONVERSATION, tokenizer, media_root)
    (sample,) = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0)
    messages = []
    for message in CONVERSATION["messages"]:
        parts = []
        for index, piece in enumerate(message["content"].split("<image>")):
            if index:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": message["role"], "content": parts})
    expected = render_chat(messages).removesuffix("\n")
    assert tokenizer.decode(sample.tokens) == expected
    assert sample.tokens == tokenizer.encode(expected)
    assert sample.media == (MediaRef(record=0, index=0), MediaRef(record=0, index=1))
    assert sample.pair_role == 0


def test_targets_cover_exactly_the_assistant_replies(tokenizer, media_root):
    record = _record(CONVERSATION, tokenizer, media_root)
    (sample,) = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0)
    pieces = [tokenizer.id_to_token(t) for t in sample.tokens]
    spans = _spans(pieces)
    assert len(spans) == 2
    expected = [0.0] * len(sample.tokens)
    for start, end in spans:
        expected[start : end + 1] = [1.0] * (end + 1 - start)
    assert sample.target_mask == expected
    trained = tokenizer.decode([t for t, m in zip(sample.tokens, sample.target_mask,
                                                  strict=True) if m])
    assert trained == "It is red.<|im_end|>Green, with a dark border.<|im_end|>"


def test_pairs_share_the_prompt_and_train_only_the_answers(tokenizer, media_root):
    value = {"prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "Describe."}]}],
             "chosen": "Coloured tiles.", "rejected": "A dog.", "images": ["2.png"]}
    record = _record(value, tokenizer, media_root)
    chosen, rejected = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0)
    assert (chosen.pair_role, rejected.pair_role) == (1, 2)
    first_target = chosen.target_mask.index(1.0)
    assert first_target == rejected.target_mask.index(1.0)
    assert chosen.tokens[:first_target] == rejected.tokens[:first_target]
    assert tokenizer.decode(chosen.tokens[:first_target]).endswith("<|im_start|>assistant\n")
    for sample, answer in ((chosen, "Coloured tiles."), (rejected, "A dog.")):
        trained = [t for t, m in zip(sample.tokens, sample.target_mask, strict=True) if m]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
        assert sample.media == (MediaRef(record=0, index=0),)


@pytest.mark.parametrize(("mode", "answer", "suffix"), [
    ("none", "Fine.", ""), ("think", "Fine.", " /think"), ("no_think", "Fine.", " /no_think"),
    ("auto", "<think>hmm</think>Fine.", " /think"), ("auto", "Fine.", " /no_think"),
])
def test_think_suffixes(tokenizer, media_root, mode, answer, suffix):
    value = {"messages": [{"role": "user", "content": "How are you?"},
                          {"role": "assistant", "content": answer}]}
    record = _record(value, tokenizer, media_root)
    (sample,) = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0,
                              options=TemplateOptions(think_mode=mode))
    assert f"user\nHow are you?{suffix}<|im_end|>" in tokenizer.decode(sample.tokens)


def test_system_prompt_options(tokenizer, media_root):
    value = {"messages": [{"role": "system", "content": "Be terse."},
                          {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    (own,) = render_record(_record(value, tokenizer, media_root), tokenizer=tokenizer, seed=0,
                           sample_index=0)
    assert tokenizer.decode(own.tokens).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    value["messages"] = value["messages"][1:]
    (none,) = render_record(_record(value, tokenizer, media_root), tokenizer=tokenizer, seed=0,
                            sample_index=0, options=TemplateOptions(system_prompt=None))
    assert tokenizer.decode(none.tokens).startswith("<|im_start|>user\nHi")


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer, media_root):
    record = _record({"text": "A page <image> with a picture.", "images": ["0.png"]},
                     tokenizer, media_root)
    (sample,) = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0)
    assert tokenizer.decode(sample.tokens) == (
        "A page <|vision_start|><|image_pad|><|vision_end|> with a picture.<|endoftext|>")
    vision = {tokenizer.vision.vision_start, tokenizer.vision.image_pad, tokenizer.vision.vision_end}
    assert sample.target_mask == [0.0 if t in vision else 1.0 for t in sample.tokens]


def _captions(tokenizer, media_root) -> list[fmt.Record]:
    texts = ["Red squares on black.", "Green tiles in rows.", "Blue and yellow cells.",
             "A dark mosaic."]
    return [_record({"image": f"{i}.png", "caption": text}, tokenizer, media_root, key=f"c{i}")
            for i, text in enumerate(texts)]


def test_caption_tasks_are_deterministic_per_seed_and_index(tokenizer, media_root):
    main, *companions = _captions(tokenizer, media_root)
    companions = tuple(companions)

    def render(seed, index):
        return render_record(main, tokenizer=tokenizer, seed=seed, sample_index=index,
                             companions=companions)[0]

    first = [render(7, i) for i in range(120)]
    assert [(s.tokens, s.target_mask, s.media, s.task) for s in first] == [
        (s.tokens, s.target_mask, s.media, s.task) for s in (render(7, i) for i in range(120))]
    tasks = Counter(s.task for s in first)
    assert set(tasks) == set(AUGMENTATIONS)
    other = [render(8, i).task for i in range(120)]
    assert other != [s.task for s in first]
    # weights decide: only QA when the others are off, only plain without companions or QA
    only_qa = TemplateOptions(caption_augmentation=CaptionAugmentation(
        plain=0, qa=1, reverse_qa=0, multi_image=0, trap=0))
    assert {render_record(main, tokenizer=tokenizer, seed=1, sample_index=i, options=only_qa,
                          companions=companions)[0].task for i in range(20)} == {"qa"}
    alone = {render_record(main, tokenizer=tokenizer, seed=1, sample_index=i)[0].task
             for i in range(40)}
    assert alone == {"plain", "qa"}


def test_caption_task_contents(tokenizer, media_root):
    main, *companions = _captions(tokenizer, media_root)
    companions = tuple(companions)
    seen = set()
    for index in range(200):
        sample = render_record(main, tokenizer=tokenizer, seed=3, sample_index=index,
                               companions=companions)[0]
        text = tokenizer.decode(sample.tokens)
        answer = tokenizer.decode([t for t, m in zip(sample.tokens, sample.target_mask,
                                                     strict=True) if m])
        assert answer.endswith("<|im_end|>")
        answer = answer.removesuffix("<|im_end|>")
        seen.add(sample.task)
        pads = text.count("<|image_pad|>")
        assert pads == len(sample.media)
        if sample.task in ("plain", "qa"):
            assert answer == "Red squares on black." and sample.media == (MediaRef(record=0,
                                                                                     index=0),)
        elif sample.task == "trap":
            assert answer == "No. It shows: Red squares on black."
            assert any(c in text.split("assistant\n")[0] for c in
                       ("Green tiles in rows.", "Blue and yellow cells.", "A dark mosaic."))
        elif sample.task == "reverse_qa":
            # the answer's label is the one printed right before this record's image
            assert len(sample.media) == 4
            position = sample.media.index(MediaRef(record=0, index=0))
            assert answer == f"Picture {position + 1}"
        elif sample.task == "multi_image":
            assert {m.record for m in sample.media} == {0, 1, 2, 3}
            assert answer in {"Red squares on black.", "Green tiles in rows.",
                              "Blue and yellow cells.", "A dark mosaic."} or (
                answer.count("Picture ") == 4)
    assert seen == set(AUGMENTATIONS)


def test_expand_rendered(tokenizer, media_root):
    record = _record(CONVERSATION, tokenizer, media_root)
    (sample,) = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0)
    ids = tokenizer.vision
    tokens, targets = expand_rendered(sample, [[ids.image_pad] * 6, [ids.image_pad] * 2], ids=ids)
    assert len(tokens) == len(sample.tokens) + 5 + 1 == len(targets)
    assert tokens.count(ids.image_pad) == 8
    assert all(m == 0.0 for t, m in zip(tokens, targets, strict=True) if t == ids.image_pad)
    assert sum(targets) == sum(sample.target_mask)
    with pytest.raises(ValueError, match="placeholders"):
        expand_rendered(sample, [[ids.image_pad]], ids=ids)


def test_caption_task_shares_follow_the_weights(tokenizer, media_root):
    main, *companions = _captions(tokenizer, media_root)
    weights = CaptionAugmentation(plain=1, qa=3, reverse_qa=0, multi_image=2, trap=2)
    options = TemplateOptions(caption_augmentation=weights)
    tasks = Counter(render_record(main, tokenizer=tokenizer, seed=11, sample_index=i,
                                  options=options, companions=tuple(companions))[0].task
                    for i in range(800))
    assert tasks["reverse_qa"] == 0
    for name, weight in (("plain", 1), ("qa", 3), ("multi_image", 2), ("trap", 2)):
        assert abs(tasks[name] / 800 - weight / 8) < 0.05, tasks


def test_media_labels(tokenizer, media_root):
    record = _record(CONVERSATION, tokenizer, media_root)
    (sample,) = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0,
                              options=TemplateOptions(media_labels=True))
    text = tokenizer.decode(sample.tokens)
    assert "user\nPicture 1: <|vision_start|>" in text
    assert "And Picture 2: <|vision_start|><|image_pad|><|vision_end|> the second" in text
    (plain,) = render_record(record, tokenizer=tokenizer, seed=0, sample_index=0)
    assert sum(sample.target_mask) == sum(plain.target_mask) and "Picture" not in (
        tokenizer.decode(plain.tokens))
