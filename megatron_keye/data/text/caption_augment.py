"""Caption augmentation: a captioned image (or video) becomes one of several training tasks.

Keye-VL trains on captions not only as "image -> caption" but recast as tasks that keep the model
from answering every image question with a caption (spec §4; keye-vl-1.5.md names QA, reverse
QA, instruction following over several images and trap questions). Each caption record is turned
into a list of turns, chosen deterministically from (seed, sample index):

- "plain":       user [media]                         -> caption
- "qa":          user [media] + a describe question    -> caption
- "reverse_qa":  user [Picture 1..n] + "which picture matches: <caption>?" -> "Picture k"
- "multi_image": user [Picture 1..n] + "describe Picture k" (or "each picture in order")
                 -> that caption (or every caption, labelled)
- "trap":        user [media] + "does this describe the image: <another caption>?"
                 -> "No. " + the true caption

The multi-image tasks and trap questions need other caption records ("companions", handed in by
the loader from the same stream); with none, or when a companion's caption equals this one, they
fall back to "qa". Turn content uses the same parts as the template: strings (tokenized at render
time), pre-tokenized caption segments, and media references (record index, media index), where
record 0 is this record and record j the j-th companion.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from megatron_keye.data.shards.format import (
    MEDIA_VIDEO,
    ROLE_ASSISTANT,
    MediaSegment,
    Record,
    TextSegment,
)

AUGMENTATIONS = ("plain", "qa", "reverse_qa", "multi_image", "trap")
NEEDS_COMPANIONS = ("reverse_qa", "multi_image", "trap")

QA_PROMPTS = (
    "Describe this {kind}.",
    "What does this {kind} show?",
    "Give a short description of the {kind}.",
    "What can you see in this {kind}?",
    "Write a caption for this {kind}.",
)
REVERSE_PROMPTS = (
    "Which of these {kinds} matches the description below? Answer with its label.\n",
    "Find the {kind} that this text describes and give its label.\n",
)
DESCRIBE_ONE_PROMPTS = ("Describe {label}.", "What does {label} show?")
DESCRIBE_ALL_PROMPT = "Describe each {kind} in order, one per line, starting with its label."
TRAP_PROMPTS = (
    "Is this an accurate description of the {kind}? ",
    "Does the following text describe this {kind}? ",
)
TRAP_ANSWER = "No. It shows: "


@dataclass(kw_only=True, frozen=True)
class CaptionAugmentation:
    """Relative weights of the caption tasks (0 disables one)."""

    plain: float = 1.0
    qa: float = 2.0
    reverse_qa: float = 1.0
    multi_image: float = 1.0
    trap: float = 1.0

    def __post_init__(self) -> None:
        weights = [getattr(self, name) for name in AUGMENTATIONS]
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"CaptionAugmentation: weights must be >= 0 with a positive sum, "
                             f"got {dict(zip(AUGMENTATIONS, weights, strict=True))}")


def sample_rng(seed: int, sample_index: int, salt: str = "caption") -> random.Random:
    """A generator that depends only on (seed, sample index, salt), in any process."""
    digest = hashlib.sha256(f"{salt}:{seed}:{sample_index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def caption_parts(record: Record) -> tuple[list, list[int]]:
    """(the caption's text segments, this record's media indices) of a caption record."""
    caption = [s for m in record.messages if m.role == ROLE_ASSISTANT for s in m.content
               if isinstance(s, TextSegment)]
    media = [s.media for m in record.messages for s in m.content if isinstance(s, MediaSegment)]
    if not caption or not media:
        raise ValueError(f"caption record {record.key!r} needs media and a caption")
    return caption, media


def _kind_word(record: Record) -> str:
    return "video" if record.media and record.media[0].type == MEDIA_VIDEO else "image"


def _choose(rng: random.Random, weights: CaptionAugmentation, allowed: tuple[str, ...]) -> str:
    names = [n for n in AUGMENTATIONS if n in allowed and getattr(weights, n) > 0]
    if not names:
        return "qa"
    return rng.choices(names, weights=[getattr(weights, n) for n in names])[0]


def augment_caption(
    record: Record,
    *,
    seed: int,
    sample_index: int,
    weights: CaptionAugmentation,
    companions: tuple[Record, ...] = (),
) -> tuple[str, list[tuple[str, list]]]:
    """(task name, turns) for a caption record; turns are (role, parts) with parts being str,
    TextSegment or ("media", record index, media index)."""
    rng = sample_rng(seed, sample_index)
    caption, media = caption_parts(record)
    kind = _kind_word(record)
    others = []
    for companion in companions:
        other_caption, other_media = caption_parts(companion)
        if [s.text for s in other_caption] != [s.text for s in caption]:
            others.append((other_caption, other_media))
    allowed = AUGMENTATIONS if others else ("plain", "qa")
    task = _choose(rng, weights, allowed)
    own_media = [("media", 0, index) for index in media]
    if task == "plain":
        return task, [("user", own_media), ("assistant", caption)]
    if task == "qa":
        prompt = rng.choice(QA_PROMPTS).format(kind=kind)
        return task, [("user", [*own_media, prompt]), ("assistant", caption)]
    if task == "trap":
        false_caption, _ = rng.choice(others)
        prompt = rng.choice(TRAP_PROMPTS).format(kind=kind)
        return task, [("user", [*own_media, prompt, *false_caption]),
                      ("assistant", [TRAP_ANSWER, *caption])]
    # reverse_qa and multi_image: the pictures in a seeded order, each labelled.
    items = [(caption, own_media)] + [
        (c, [("media", j + 1, i) for i in m]) for j, (c, m) in enumerate(others)]
    order = list(range(len(items)))
    rng.shuffle(order)
    label_word = "Video" if kind == "video" else "Picture"
    labels = {item: f"{label_word} {position + 1}" for position, item in enumerate(order)}
    user: list = []
    for item in order:
        user.extend([f"{labels[item]}: ", *items[item][1], "\n"])
    if task == "reverse_qa":
        user.extend([rng.choice(REVERSE_PROMPTS).format(kind=kind, kinds=kind + "s"), *caption])
        return task, [("user", user), ("assistant", [labels[0]])]
    if rng.random() < 0.5:
        target = rng.randrange(len(items))
        user.append(rng.choice(DESCRIBE_ONE_PROMPTS).format(label=labels[target]))
        return task, [("user", user), ("assistant", items[target][0])]
    user.append(DESCRIBE_ALL_PROMPT.format(kind=kind))
    answer: list = []
    for position, item in enumerate(order):
        answer.extend([("\n" if position else "") + f"{labels[item]}: ", *items[item][0]])
    return task, [("user", user), ("assistant", answer)]
