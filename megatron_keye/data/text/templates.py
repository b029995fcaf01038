"""The ChatML conversation template of Keye-VL (Qwen2 style), as Jinja and as plain Python.

A message's content is a string or a list of parts {"type": "text", "text": ...},
{"type": "image"} or {"type": "video"}. Each image part becomes
`<|vision_start|><|image_pad|><|vision_end|>` and each video part
`<|vision_start|><|video_pad|><|vision_end|>`; the single pad is later expanded into the image's
or video's tokens (`vision_tokens.expand_vision_placeholders`). A conversation without a system
message gets "You are a helpful assistant.". The Jinja string is written into the shipped
tokenizer's `tokenizer_config.json` so `transformers`' `apply_chat_template` renders the same text
as `render_chat`.

Shard records (`data/shards/format.py`) are rendered by `render_record`, which the loader calls:
ChatML around the record's pre-tokenized segments, the think/no_think suffixes, assistant-only
target masks, pairs as (chosen, rejected) sequences, and caption records recast as QA / reverse QA /
multi-image / trap tasks (`caption_augment.py`), chosen per (seed, sample index). Vision pads stay
single until the loader knows each media item's tokens (`expand_rendered`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_keye.data.shards.format import (
    KIND_CAPTION,
    KIND_PAIR,
    KIND_TEXT,
    MEDIA_VIDEO,
    MediaSegment,
    Record,
    TextSegment,
)
from megatron_keye.data.text.caption_augment import CaptionAugmentation, augment_caption
from megatron_keye.data.text.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    THINK_START,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    VisionTokenIds,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
VIDEO_PLACEHOLDER = f"{VISION_START}{VIDEO_PAD}{VISION_END}"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}"
    + IMAGE_PLACEHOLDER
    + "{% elif part['type'] == 'video' %}"
    + VIDEO_PLACEHOLDER
    + "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts")
    pieces = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "video":
            pieces.append(VIDEO_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise ValueError(f"{where}: part {index} must be text, image or video, got {part!r}")
    return "".join(pieces)


def render_chat(messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text, identical to rendering CHAT_TEMPLATE."""
    lines = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str):
            raise ValueError(f"message {index}: needs a string 'role'")
        if index == 0 and role != "system":
            lines.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        text = _content_text(message.get("content"), f"message {index}")
        lines.append(f"{IM_START}{role}\n{text}{IM_END}\n")
    if add_generation_prompt:
        lines.append(f"{IM_START}assistant\n")
    return "".join(lines)


# ---- shard records -> training token ids (the loader calls `render_record`) ---------------------
#
# A record's text is tokenized per segment at preprocessing time; here the ChatML scaffolding is
# added around it, so changing the template, the system prompt, the think suffixes or the caption
# tasks needs no re-preprocessing. Each media item becomes `<|vision_start|>PAD<|vision_end|>` with
# ONE pad (`<|image_pad|>` or `<|video_pad|>`); the loader replaces it, once the media is decoded,
# with the item's expanded tokens (`expand_rendered`). `target_mask[i]` = 1 when token i is
# trained as a prediction (assistant text and the `<|im_end|>` that closes an assistant turn, or
# every text token of a plain document), 0 otherwise; the label of position i is token i+1 with
# weight target_mask[i+1] (the convention of `data/vision_batch.VisionSample`).

THINK_MODES = ("none", "think", "no_think", "auto")
THINK_SUFFIX = " /think"
NO_THINK_SUFFIX = " /no_think"


@dataclass(kw_only=True, frozen=True)
class TemplateOptions:
    """How records are rendered into training sequences."""

    # System turn for records without one; None = no system turn.
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    # "none": user text as is; "think"/"no_think": append " /think" / " /no_think" to every user
    # turn that an assistant turn answers; "auto": the suffix each answer calls for (an answer
    # that opens with <think> gets /think, any other /no_think).
    think_mode: str = "none"
    # Caption records are recast as QA / reverse QA / multi-image / trap tasks; None = plain.
    caption_augmentation: CaptionAugmentation | None = field(default_factory=CaptionAugmentation)
    end_text_with_eos: bool = True  # plain documents end with <|endoftext|> (a target)
    # Conversations and pairs: "Picture N: " / "Video N: " before each image / video (the
    # optional labels of Keye's template; caption tasks label their pictures themselves).
    media_labels: bool = False

    def __post_init__(self) -> None:
        if self.think_mode not in THINK_MODES:
            raise ValueError(f"TemplateOptions.think_mode must be one of {THINK_MODES}, got "
                             f"{self.think_mode!r}")


@dataclass(kw_only=True, frozen=True)
class MediaRef:
    """A media item a rendered sequence uses: `record` 0 is the record itself, j > 0 its j-th
    companion; `index` points into that record's `media`."""

    record: int
    index: int


@dataclass(kw_only=True, frozen=True)
class RenderedSample:
    """One training sequence of a record, vision placeholders not yet expanded."""

    tokens: list[int]
    target_mask: list[float]
    media: tuple[MediaRef, ...]  # in placeholder order
    pair_role: int = 0  # 0 = not a pair, 1 = chosen, 2 = rejected (data/batch.py CHOSEN/REJECTED)
    task: str = ""  # the caption task, when one was chosen
    key: str = ""


class _Builder:
    """Accumulates tokens, target flags and media references."""

    def __init__(self, tokenizer, media_types: list[tuple[str, ...]], *, labels: bool = False):
        self.tokenizer = tokenizer
        self.media_types = media_types  # per record: the type of each media item
        self.labels = labels  # "Picture N: " / "Video N: " before each media item
        self.counts = {"image": 0, "video": 0}
        self.tokens: list[int] = []
        self.targets: list[float] = []
        self.media: list[MediaRef] = []
        ids = tokenizer.vision
        self.image = (ids.vision_start, ids.image_pad, ids.vision_end)
        self.video = (ids.vision_start, ids.video_pad, ids.vision_end)

    def ids(self, values, target: bool) -> None:
        self.tokens.extend(values)
        self.targets.extend([1.0 if target else 0.0] * len(values))

    def text(self, text: str, target: bool) -> None:
        if text:
            self.ids(self.tokenizer.encode(text), target)

    def special(self, token: str, target: bool) -> None:
        self.ids([self.tokenizer.special_token_id(token)], target)

    def part(self, part, target: bool) -> None:
        if isinstance(part, str):
            self.text(part, target)
        elif isinstance(part, TextSegment):
            self.ids(part.ids, target)
        else:  # ("media", record, index) or MediaSegment
            record, index = (0, part.media) if isinstance(part, MediaSegment) else part[1:]
            kind = self.media_types[record][index]
            self.counts[kind] += 1
            if self.labels:
                word = "Video" if kind == MEDIA_VIDEO else "Picture"
                self.text(f"{word} {self.counts[kind]}: ", False)
            self.ids(self.video if kind == MEDIA_VIDEO else self.image, False)
            self.media.append(MediaRef(record=record, index=index))


def _think_suffix(mode: str, answer: list) -> str:
    if mode == "think":
        return THINK_SUFFIX
    if mode == "no_think":
        return NO_THINK_SUFFIX
    if mode == "auto":
        first = next((p for p in answer if isinstance(p, str | TextSegment)), None)
        text = first if isinstance(first, str) else first.text if first is not None else ""
        return THINK_SUFFIX if text.lstrip().startswith(THINK_START) else NO_THINK_SUFFIX
    return ""


def _render_turns(builder: _Builder, turns: list[tuple[str, list]], *, options: TemplateOptions,
                  trained: range) -> None:
    """ChatML for (role, parts) turns; assistant turns with index in `trained` are targets."""
    if turns and turns[0][0] != "system" and options.system_prompt is not None:
        builder.special(IM_START, False)
        builder.text(f"system\n{options.system_prompt}", False)
        builder.special(IM_END, False)
        builder.text("\n", False)
    for index, (role, parts) in enumerate(turns):
        target = role == "assistant" and index in trained
        builder.special(IM_START, False)
        builder.text(f"{role}\n", False)
        for part in parts:
            builder.part(part, target)
        if role == "user" and index + 1 < len(turns) and turns[index + 1][0] == "assistant":
            builder.text(_think_suffix(options.think_mode, turns[index + 1][1]), False)
        builder.special(IM_END, target)
        if index + 1 < len(turns):
            builder.text("\n", False)


def _turns(messages) -> list[tuple[str, list]]:
    return [(m.role, list(m.content)) for m in messages]


def render_record(
    record: Record,
    *,
    tokenizer,
    seed: int,
    sample_index: int,
    options: TemplateOptions | None = None,
    companions: tuple[Record, ...] = (),
) -> list[RenderedSample]:
    """The training sequences of a shard record: one, or two for a pair (chosen, rejected).

    `tokenizer` is a KeyeTokenizer (it must be the one the shards were written with);
    `sample_index` is the record's position in the global sample order, so together with `seed`
    it fixes the caption task; `companions` are other caption records the multi-image tasks and
    trap questions may use (their media then appear as MediaRef(record=j, ...)).
    """
    options = options or TemplateOptions()
    media_types = [tuple(m.type for m in r.media) for r in (record, *companions)]
    if record.kind == KIND_TEXT:
        builder = _Builder(tokenizer, media_types)
        for message in record.messages:
            for part in message.content:
                builder.part(part, True)
        if options.end_text_with_eos:
            builder.special(ENDOFTEXT, True)
        return [_done(builder, record)]
    if record.kind == KIND_PAIR:
        out = []
        prompt = _turns(record.messages)
        if options.think_mode == "auto":  # both sides share the prompt the chosen answer implies
            chosen_suffix = _think_suffix("auto", _turns(record.chosen)[0][1])
            mode = "think" if chosen_suffix == THINK_SUFFIX else "no_think"
            options = dataclasses.replace(options, think_mode=mode)
        for role, side in ((1, record.chosen), (2, record.rejected)):
            builder = _Builder(tokenizer, media_types, labels=options.media_labels)
            turns = prompt + _turns(side)
            _render_turns(builder, turns, options=options, trained=range(len(prompt), len(turns)))
            out.append(_done(builder, record, pair_role=role))
        return out
    task = ""
    turns = _turns(record.messages)
    if record.kind == KIND_CAPTION and options.caption_augmentation is not None:
        task, turns = augment_caption(record, seed=seed, sample_index=sample_index,
                                      weights=options.caption_augmentation,
                                      companions=companions)
    builder = _Builder(tokenizer, media_types, labels=options.media_labels and not task)
    _render_turns(builder, turns, options=options, trained=range(len(turns)))
    return [_done(builder, record, task=task)]


def _done(builder: _Builder, record: Record, *, pair_role: int = 0, task: str = "") -> RenderedSample:
    if not any(builder.targets):
        raise ValueError(f"record {record.key!r}: the rendered sequence has no trained token")
    return RenderedSample(tokens=builder.tokens, target_mask=builder.targets,
                          media=tuple(builder.media), pair_role=pair_role, task=task,
                          key=record.key)


def expand_rendered(
    sample: RenderedSample, media_tokens: Sequence[Sequence[int]], *, ids: VisionTokenIds
) -> tuple[list[int], list[float]]:
    """(tokens, target_mask) with the k-th single pad replaced by `media_tokens[k]`.

    `media_tokens[k]` is what the k-th media item of `sample.media` expands to: the image pads
    (`[ids.image_pad] * tokens`) or a video's frame tokens (`vision_tokens.video_frame_token_ids`).
    Expanded tokens are never targets.
    """
    tokens: list[int] = []
    targets: list[float] = []
    used = 0
    for token, target in zip(sample.tokens, sample.target_mask, strict=True):
        if token in (ids.image_pad, ids.video_pad):
            if used >= len(media_tokens):
                raise ValueError(f"sample {sample.key!r}: more placeholders than the "
                                 f"{len(media_tokens)} media given")
            tokens.extend(media_tokens[used])
            targets.extend([0.0] * len(media_tokens[used]))
            used += 1
        else:
            tokens.append(token)
            targets.append(target)
    if used != len(media_tokens):
        raise ValueError(f"sample {sample.key!r}: {used} placeholders for {len(media_tokens)} media")
    return tokens, targets
