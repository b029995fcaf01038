"""Input formats of `megatron-keye preprocess`: one JSONL line -> one shard `Record` (or a reject).

Accepted line formats (detected by their fields, first match wins):
- ms-swift pairs: `messages` + `rejected_response` (the last assistant turn is the chosen answer).
- pairs: `chosen` + `rejected`, with `prompt` (TRL explicit prompt; strings or message lists), with
  `conversations` (ShareGPT/LLaMA-Factory: the prompt turns, chosen/rejected single turns), or alone
  (TRL implicit prompt: two conversations whose longest common prefix is the prompt).
- ms-swift / OpenAI conversations: `messages` [{role, content}], plus `images` / `videos`.
- ShareGPT / LLaVA conversations: `conversations` [{from, value}] (or {role, content}), plus
  `image`/`images`, `video`/`videos`, optional top-level `system`.
- captions: `caption` with `image`/`images` (or `video`/`videos`).
- plain text: `text` (may hold `<image>`/`<video>` tags with `images`/`videos`).
Pairs may carry a numeric `margin` (reward-model data).

Media: strings (or {"path": ...}) relative to the media root. In text, each `<image>`/`<video>` tag
takes the next item of its list; a content part {"type": "image"} without a path does too, and
one with a path ({"type": "image", "image": P}, {"type": "image_url", "image_url": {"url": P}})
names its own. When the text has no tag of a kind at all, that kind's media are put at the start
of the first user turn (TRL/ms-swift convention); any other count mismatch is a reject.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_keye.data.shards import format as fmt
from megatron_keye.data.text.tokenizer import (
    ENDOFTEXT,
    FAST_END,
    FAST_START,
    FRAME,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)

ROLE_ALIASES = {
    "system": fmt.ROLE_SYSTEM,
    "user": fmt.ROLE_USER, "human": fmt.ROLE_USER,
    "assistant": fmt.ROLE_ASSISTANT, "gpt": fmt.ROLE_ASSISTANT, "model": fmt.ROLE_ASSISTANT,
    "bot": fmt.ROLE_ASSISTANT, "chatgpt": fmt.ROLE_ASSISTANT,
}
TAG_PATTERN = re.compile(r"(<image>|<video>)")
TAG_TYPES = {"<image>": fmt.MEDIA_IMAGE, "<video>": fmt.MEDIA_VIDEO}
IMAGE_TOKEN_PIXELS = 28 * 28
VIDEO_FRAME_TEXT_TOKENS = 5  # <|frame|>, a timestamp like "12.5", fast markers


class RejectError(Exception):
    """A line that cannot be used: `reason` is one of format.REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(kw_only=True, frozen=True)
class SourceOptions:
    """How lines of one input become records."""

    source: str  # the source name stored in every record (blending groups by it)
    media_root: Path
    max_tokens: int | None = None  # reject records whose token_estimate exceeds this


# ---- normalization: line -> (kind, messages with media placeholders, pair sides) ---------------
# A normalized message is (role, [str | ("image"|"video", path or None), ...]).

def _bad(detail: str) -> RejectError:
    return RejectError(fmt.REJECT_BAD_FIELD, detail)


def _media_list(record: dict, *names: str) -> list[str]:
    items: list = []
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, str | dict):
            value = [value]
        if not isinstance(value, list):
            raise _bad(f"'{name}' must be a path or a list of paths")
        for index, item in enumerate(value):
            if isinstance(item, dict) and isinstance(item.get("path"), str):
                item = item["path"]
            if not isinstance(item, str) or not item:
                raise _bad(f"'{name}'[{index}] must be a path string (frame lists unsupported)")
            items.append(item)
    return items


def _parts_of_text(text: str) -> list:
    parts: list = []
    for piece in TAG_PATTERN.split(text):
        if piece in TAG_TYPES:
            parts.append((TAG_TYPES[piece], None))
        elif piece:
            parts.append(piece)
    return parts


def _parts_of_content(content: object, where: str) -> list:
    if isinstance(content, str):
        return _parts_of_text(content)
    if not isinstance(content, list):
        raise _bad(f"{where}: content must be a string or a list of parts")
    parts: list = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.extend(_parts_of_text(part["text"]))
        elif kind in ("image", "video"):
            path = part.get(kind)
            if isinstance(path, dict):
                path = path.get("path") or path.get("url")
            parts.append((kind, path if isinstance(path, str) and path else None))
        elif kind in ("image_url", "video_url") and isinstance(part.get(kind), dict):
            parts.append((kind.removesuffix("_url"), part[kind].get("url")))
        else:
            raise _bad(f"{where}: part {index} must be text, image or video")
    return parts


def _messages(turns: object, where: str) -> list[tuple[str, list]]:
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise _bad(f"'{where}' must be a non-empty list of turns")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _bad(f"{where}[{index}] must be an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise _bad(f"{where}[{index}]: unknown role {role!r}")
        out.append((ROLE_ALIASES[role], _parts_of_content(content, f"{where}[{index}]")))
    return out


def _side(value: object, where: str, role: str) -> list[tuple[str, list]]:
    """A TRL prompt/chosen/rejected: a string (one turn of `role`) or a list of turns."""
    if isinstance(value, str):
        return [(role, _parts_of_text(value))]
    return _messages(value, where)


def _with_system(record: dict, messages: list) -> list:
    system = record.get("system")
    if isinstance(system, str) and system and not (messages and messages[0][0] == "system"):
        return [(fmt.ROLE_SYSTEM, _parts_of_text(system)), *messages]
    return messages


def normalize(record: dict) -> tuple[str, list, list, list]:
    """(kind, messages, chosen, rejected) with media parts still naming paths or None."""
    if "messages" in record and "rejected_response" in record:
        messages = _messages(record["messages"], "messages")
        if messages[-1][0] != fmt.ROLE_ASSISTANT:
            raise RejectError(fmt.REJECT_NO_ASSISTANT, "messages must end with the chosen answer")
        rejected = record["rejected_response"]
        if not isinstance(rejected, str):
            raise _bad("'rejected_response' must be a string")
        return (fmt.KIND_PAIR, messages[:-1], [messages[-1]],
                [(fmt.ROLE_ASSISTANT, _parts_of_text(rejected))])
    if "chosen" in record and "rejected" in record:
        if "prompt" in record:
            prompt = _side(record["prompt"], "prompt", fmt.ROLE_USER)
        elif "conversations" in record:
            prompt = _with_system(record, _messages(record["conversations"], "conversations"))
        else:
            prompt = []
        chosen = _side(record["chosen"], "chosen", fmt.ROLE_ASSISTANT)
        rejected = _side(record["rejected"], "rejected", fmt.ROLE_ASSISTANT)
        if not prompt:  # implicit prompt: the shared prefix of the two conversations
            shared = 0
            while (shared < min(len(chosen), len(rejected)) - 1
                   and chosen[shared] == rejected[shared]):
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        return fmt.KIND_PAIR, prompt, chosen, rejected
    if "messages" in record:
        return fmt.KIND_CONVERSATION, _messages(record["messages"], "messages"), [], []
    if "conversations" in record:
        messages = _with_system(record, _messages(record["conversations"], "conversations"))
        return fmt.KIND_CONVERSATION, messages, [], []
    if "caption" in record:
        caption = record["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise _bad("'caption' must be a non-empty string")
        return (fmt.KIND_CAPTION,
                [(fmt.ROLE_USER, []), (fmt.ROLE_ASSISTANT, _parts_of_text(caption))], [], [])
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise _bad("'text' must be a non-empty string")
        return fmt.KIND_TEXT, [(fmt.ROLE_TEXT, _parts_of_text(record["text"]))], [], []
    raise RejectError(fmt.REJECT_UNKNOWN_FORMAT,
                      f"no known fields (messages, conversations, prompt/chosen/rejected, caption, "
                      f"text); has {sorted(record)[:8]}")


def _assign_media(record: dict, groups: list[list]) -> None:
    """Fill path-less media parts from the record's image/video lists, in order (in place)."""
    lists = {fmt.MEDIA_IMAGE: _media_list(record, "images", "image"),
             fmt.MEDIA_VIDEO: _media_list(record, "videos", "video")}
    for kind, paths in lists.items():
        slots = [(m, i) for messages in groups for m in messages
                 for i, p in enumerate(m[1]) if isinstance(p, tuple) and p[0] == kind
                 and p[1] is None]
        if not slots and paths:
            first_user = next((m for messages in groups for m in messages
                               if m[0] in (fmt.ROLE_USER, fmt.ROLE_TEXT)), None)
            if first_user is None:
                raise RejectError(fmt.REJECT_MEDIA_MISMATCH,
                                  f"{len(paths)} {kind}(s) but no user turn to put them in")
            first_user[1][0:0] = [(kind, path) for path in paths]
        elif len(slots) != len(paths):
            raise RejectError(fmt.REJECT_MEDIA_MISMATCH,
                              f"{len(slots)} <{kind}> placeholder(s) but {len(paths)} {kind}(s)")
        else:
            for (message, index), path in zip(slots, paths, strict=True):
                message[1][index] = (kind, path)


# ---- media probing ------------------------------------------------------------------------------

def _probe_image(data: bytes) -> dict:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        width, height = image.size
    return {"width": width, "height": height}


def _probe_video(data: bytes) -> dict:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        frame = next(iter(container.decode(stream)), None)
        if frame is None:
            raise ValueError("no decodable frame")
        fps = float(stream.average_rate or 0) or None
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        frames = int(stream.frames) or (round(duration * fps) if duration and fps else None)
        return {"width": frame.width, "height": frame.height, "num_frames": frames, "fps": fps,
                "duration": round(duration, 6) if duration is not None else None}


def _member_ext(path: str, kind: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix or not suffix.isalnum():
        return "jpg" if kind == fmt.MEDIA_IMAGE else "mp4"
    return suffix


def load_media(kind: str, path: str, index: int, media_root: Path) -> fmt.MediaItem:
    """Read and probe one media file; RejectError if it is missing or cannot be decoded."""
    file = media_root / path
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise RejectError(fmt.REJECT_MISSING_MEDIA, f"{kind} {path!r} not found under "
                                                    f"{media_root}") from None
    except OSError as error:
        raise RejectError(fmt.REJECT_UNREADABLE_MEDIA, f"{kind} {path!r}: {error}") from None
    try:
        info = _probe_image(data) if kind == fmt.MEDIA_IMAGE else _probe_video(data)
    except Exception as error:  # PIL and PyAV raise many types for corrupt data
        raise RejectError(fmt.REJECT_UNREADABLE_MEDIA,
                          f"{kind} {path!r} cannot be decoded: {type(error).__name__}: "
                          f"{str(error)[:200]}") from None
    return fmt.MediaItem(type=kind, member=f"{index}.{_member_ext(path, kind)}", path=path,
                         bytes=len(data), data=data, **info)


def vision_token_estimate(item: fmt.MediaItem) -> int:
    """Vision tokens the loader will likely produce for a media item (no decoding)."""
    from megatron_keye.data.media.image import smart_resize

    if item.type == fmt.MEDIA_VIDEO:
        return _video_token_estimate(item)

    try:
        height, width = smart_resize(item.height or 28, item.width or 28)
    except ValueError:
        return math.ceil((item.height or 28) * (item.width or 28) / IMAGE_TOKEN_PIXELS)
    return height * width // IMAGE_TOKEN_PIXELS


def _video_token_estimate(item: fmt.MediaItem) -> int:
    """Sampled frames (keye-vl-utils' rule, default VideoConfig) x slow-frame tokens, capped by
    the video budget, plus the frame marker and timestamp text; an upper bound, since fast
    frames take fewer tokens. VIDEO_TOKEN_ESTIMATE when the header lacks frames or rate."""
    from megatron_keye.data.media.image import smart_resize
    from megatron_keye.data.media.video import smart_nframes
    from megatron_keye.data.media.video_config import VideoConfig

    if not (item.num_frames and item.fps and item.width and item.height):
        return fmt.VIDEO_TOKEN_ESTIMATE
    config = VideoConfig()
    frames = smart_nframes(item.num_frames, item.fps, config=config)
    try:
        height, width = smart_resize(item.height, item.width, factor=config.factor,
                                     min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    except ValueError:
        return fmt.VIDEO_TOKEN_ESTIMATE
    vision = min(frames * (height * width // IMAGE_TOKEN_PIXELS),
                 config.total_pixels // IMAGE_TOKEN_PIXELS)
    return vision + frames * VIDEO_FRAME_TEXT_TOKENS


# ---- the whole conversion -----------------------------------------------------------------------

# Tokens the template and the vision expansion place; text must not spell them (<think> and
# </think> are allowed: answers carry them).
STRUCTURAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD,
                     FRAME, FAST_START, FAST_END)


def _check_special_tokens(encoded: list[list[int]], tokenizer) -> None:
    forbidden = {tokenizer.special_token_id(t): t for t in STRUCTURAL_TOKENS}
    for ids in encoded:
        hit = next((i for i in ids if i in forbidden), None)
        if hit is not None:
            raise RejectError(fmt.REJECT_SPECIAL_TOKEN,
                              f"the text contains {forbidden[hit]!r}")


def _has_answer(messages: list) -> bool:
    return any(role == fmt.ROLE_ASSISTANT and any(
        (isinstance(p, str) and p.strip()) or isinstance(p, tuple) for p in parts)
        for role, parts in messages)


def convert_line(line: str | bytes, *, key: str, file: str, line_number: int,
                 options: SourceOptions, tokenizer) -> fmt.Record:
    """One JSONL line -> a Record with media bytes and token ids; RejectError if unusable."""
    try:
        value = json.loads(line)
    except ValueError as error:  # UnicodeDecodeError included
        raise RejectError(fmt.REJECT_BAD_JSON, str(error)[:200]) from None
    if not isinstance(value, dict):
        raise RejectError(fmt.REJECT_BAD_JSON, f"a line must be a JSON object, got "
                                               f"{type(value).__name__}")
    kind, messages, chosen, rejected = normalize(value)
    _assign_media(value, [messages, chosen, rejected])
    if kind == fmt.KIND_CONVERSATION and not _has_answer(messages):
        raise RejectError(fmt.REJECT_NO_ASSISTANT, "the conversation has no assistant turn")
    if kind == fmt.KIND_PAIR:
        if not messages or messages[-1][0] != fmt.ROLE_USER:
            raise _bad("a pair's prompt must be non-empty and end with a user turn")
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if not _has_answer(side):
                raise RejectError(fmt.REJECT_NO_ASSISTANT, f"the {name} side has no answer")
    margin = value.get("margin")
    if margin is not None and (kind != fmt.KIND_PAIR or not isinstance(margin, int | float)):
        raise _bad("'margin' must be a number on a pair")

    media: list[fmt.MediaItem] = []
    texts: list[str] = []

    def build(turns: list) -> tuple[fmt.Message, ...]:
        out = []
        for role, parts in turns:
            content: list = []
            for part in parts:
                if isinstance(part, tuple):
                    media_kind, path = part
                    media.append(load_media(media_kind, path, len(media), options.media_root))
                    content.append(fmt.MediaSegment(media=len(media) - 1))
                else:
                    texts.append(part)
                    content.append(fmt.TextSegment(text=part, ids=()))
            out.append((role, content))
        return out

    built = [build(messages), build(chosen), build(rejected)]
    encoded = tokenizer.encode_batch(texts) if texts else []
    _check_special_tokens(encoded, tokenizer)
    ids = iter(encoded)
    sides = []
    text_tokens = 0
    for turns in built:
        side = []
        for role, content in turns:
            segments = []
            for segment in content:
                if isinstance(segment, fmt.TextSegment):
                    segment = fmt.TextSegment(text=segment.text, ids=tuple(next(ids)))
                    text_tokens += len(segment.ids)
                segments.append(segment)
            side.append(fmt.Message(role=role, content=tuple(segments)))
        sides.append(tuple(side))
    estimate = text_tokens + sum(vision_token_estimate(item) for item in media)
    if options.max_tokens is not None and estimate > options.max_tokens:
        raise RejectError(fmt.REJECT_TOO_MANY_TOKENS,
                          f"about {estimate} tokens (text {text_tokens}), limit "
                          f"{options.max_tokens}")
    return fmt.Record(
        key=key, source=options.source, kind=kind, messages=sides[0], media=tuple(media),
        chosen=sides[1], rejected=sides[2], margin=float(margin) if margin is not None else None,
        origin_file=file, origin_line=line_number, text_tokens=text_tokens,
        token_estimate=estimate,
    )
