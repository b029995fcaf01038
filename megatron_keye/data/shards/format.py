"""The shard format: what `megatron-keye preprocess` writes and the loader reads.

Files of one preprocessed corpus `NAME` in the output directory:
- `NAME-000000.tar`, `NAME-000001.tar`, ...: POSIX tar shards (WebDataset layout). A sample is the
  contiguous members sharing a key (no dots in keys):
    `KEY.json`      the record (UTF-8 JSON, sorted keys), schema below;
    `KEY.I.EXT`     the bytes of media item I (0-based, in the record's `media` order), EXT the
                    source file's lower-cased extension (`0.jpg`, `1.mp4`); webdataset splits the
                    name at the first dot, so the sample dict has keys "json", "0.jpg", "1.mp4".
- `NAME.index.json`: `ShardIndex` (format version, per-shard sample counts, sizes and sha256,
  per-source sample and token counts, the tokenizer's fingerprint). Written last: a corpus without
  it is incomplete (a preprocessing run that stopped, to be resumed).
- `NAME.rejects.jsonl`: one line per input record that was not used (file, line, reason, detail).

The record (`KEY.json`, format version 1):
    {"format_version": 1, "key": KEY, "source": "laion", "kind": "conversation",
     "origin": {"file": "data/laion.jsonl", "line": 17},          # 1-based input line
     "messages": [MESSAGE, ...],
     "chosen": [MESSAGE, ...], "rejected": [MESSAGE, ...],       # kind "pair" only
     "margin": null,                                              # pairs: optional reward margin
     "media": [{"type": "image", "member": "0.jpg", "path": "imgs/a.jpg", "bytes": 52311,
                "width": 640, "height": 480},
               {"type": "video", "member": "1.mp4", "path": "v/b.mp4", "bytes": 901233,
                "width": 320, "height": 224, "num_frames": 40, "fps": 4.0, "duration": 10.0}],
     "text_tokens": 83, "token_estimate": 1411}
    MESSAGE = {"role": ROLE, "content": [SEGMENT, ...]}
    SEGMENT = {"text": "Describe ", "ids": [..token ids..]}  |  {"media": 0}

Kinds (`RecordKind`):
- "conversation": system/user/assistant turns; at least one assistant turn.
- "caption": [user: the media segments] [assistant: the caption]; the loader's template may turn
  it into a QA / reverse-QA / multi-image / trap-question sample (`templates.py`).
- "text": one message of role "text" (a plain document, every token trained; may hold media).
- "pair": `messages` is the shared prompt (it ends with a user turn); `chosen` and `rejected` are
  the two continuations (one or more assistant turns each). Preference (DPO/MPO) and reward pairs.

Text is tokenized per segment with the corpus' tokenizer (`ids`); the chat-template tokens
(`<|im_start|>`, roles, `<|im_end|>`, the system prompt, think suffixes, caption prompts) are NOT
in the record: the loader's template adds them, so a template change needs no re-preprocessing.
Media segments stay unexpanded in the record and in what the template returns: the template emits
`<|vision_start|><|image_pad|><|vision_end|>` (or the video pad) with a single pad per media item,
and the loader expands that pad once it has decoded the media and knows the grids
(`templates.expand_rendered`, built on `vision_tokens.expand_vision_placeholders`).

`token_estimate` = text tokens + an estimate of the vision tokens (images: the smart-resize grid
of the stored width/height under the default image limits; videos: the sampled frames of the
default video settings at slow-frame size, capped by the video budget, plus frame text — an upper
bound; `VIDEO_TOKEN_ESTIMATE` when the header lacks frame count or rate), for packing, filtering
and blending decisions that must not decode media.

Compatibility: readers accept any `format_version <= FORMAT_VERSION`; later versions only add
fields, and `read_record` keeps unknown fields in `Record.extra`.

Reference log-prob sidecars (`megatron-keye reference-logprobs`, read with `data.ref_logprobs`):
next to shard `NAME-000003.tar`, the file `NAME-000003.reflogp-TAG.npz` (`reflogp_path`) holds,
for every sample of the shard that training packs (each side of a pair separately), the frozen
reference model's per-token log p(label) over that sample's rendered, expanded tokens (label
shifted within the sample; 0 where the label is ignored). NumPy arrays (no pickles):
    keys        str [n]      the sample key
    parts       int64 [n]    the sample's place in its unit (0; pairs: 0 chosen, 1 rejected)
    tokens      str [n]      `token_fingerprint` of the sample's expanded token ids
    offsets     int64 [n+1]  entry i spans logprobs[offsets[i]:offsets[i+1]] (= its token count)
    logprobs    float32      all entries, concatenated
    meta        str []       JSON: sidecar version, tag, checkpoint, seq_length, seed
The loader looks an entry up by (key, part) and refuses a sample whose tokens differ from the
fingerprint or whose length differs (another template, media budget, seq_length or tokenizer than
the pass used): the error names the sample and the sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FORMAT_VERSION = 1

KIND_CONVERSATION = "conversation"
KIND_CAPTION = "caption"
KIND_TEXT = "text"
KIND_PAIR = "pair"
RECORD_KINDS = (KIND_CONVERSATION, KIND_CAPTION, KIND_TEXT, KIND_PAIR)
RecordKind = Literal["conversation", "caption", "text", "pair"]

ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TEXT = "system", "user", "assistant", "text"
ROLES = (ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TEXT)

MEDIA_IMAGE, MEDIA_VIDEO = "image", "video"
MEDIA_TYPES = (MEDIA_IMAGE, MEDIA_VIDEO)

JSON_MEMBER = "json"  # the record's member extension (KEY.json)
VIDEO_TOKEN_ESTIMATE = 2048  # vision tokens assumed for a video whose header lacks frames/rate

# Reject reasons written to NAME.rejects.jsonl (stable strings; the detail says more).
REJECT_BAD_JSON = "bad_json"  # the line is not a JSON object
REJECT_UNKNOWN_FORMAT = "unknown_format"  # no known set of fields
REJECT_BAD_FIELD = "bad_field"  # a known field has the wrong type or value
REJECT_MISSING_MEDIA = "missing_media"  # a media file does not exist
REJECT_UNREADABLE_MEDIA = "unreadable_media"  # a media file cannot be decoded
REJECT_MEDIA_MISMATCH = "media_mismatch"  # <image>/<video> tags and media lists disagree
REJECT_NO_ASSISTANT = "no_assistant_turn"  # a conversation (or pair side) without an answer
REJECT_TOO_MANY_TOKENS = "too_many_tokens"  # token_estimate above the configured maximum
REJECT_SPECIAL_TOKEN = "special_token_in_text"  # text spells a structural token (<|im_start|>,
# <|image_pad|>, ...) that would corrupt the template or the vision placeholders
REJECT_INTERNAL = "internal_error"  # an unexpected exception while converting (a bug: report it)
REJECT_REASONS = (
    REJECT_BAD_JSON, REJECT_UNKNOWN_FORMAT, REJECT_BAD_FIELD, REJECT_MISSING_MEDIA,
    REJECT_UNREADABLE_MEDIA, REJECT_MEDIA_MISMATCH, REJECT_NO_ASSISTANT, REJECT_TOO_MANY_TOKENS,
    REJECT_SPECIAL_TOKEN, REJECT_INTERNAL,
)


class RecordFormatError(ValueError):
    """A shard sample that does not follow this format (the message names the key and field)."""


@dataclass(kw_only=True, frozen=True)
class TextSegment:
    """A run of text and its token ids (tokenized alone, no special tokens added)."""

    text: str
    ids: tuple[int, ...]


@dataclass(kw_only=True, frozen=True)
class MediaSegment:
    """A reference to the record's media item `media` (an index into `Record.media`)."""

    media: int


Segment = TextSegment | MediaSegment


@dataclass(kw_only=True, frozen=True)
class Message:
    role: str  # one of ROLES
    content: tuple[Segment, ...]


@dataclass(kw_only=True, frozen=True)
class MediaItem:
    """One image or video of a record; `data` holds its bytes once read from a shard."""

    type: str  # "image" | "video"
    member: str  # member name after the key, e.g. "0.jpg"
    path: str  # the path in the input, relative to the media root
    bytes: int
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None  # videos
    fps: float | None = None  # videos
    duration: float | None = None  # videos, seconds
    data: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(kw_only=True, frozen=True)
class Record:
    """One sample of a shard, as the loader sees it."""

    key: str
    source: str
    kind: str  # one of RECORD_KINDS
    messages: tuple[Message, ...]
    media: tuple[MediaItem, ...] = ()
    chosen: tuple[Message, ...] = ()  # pairs
    rejected: tuple[Message, ...] = ()  # pairs
    margin: float | None = None  # pairs
    origin_file: str = ""
    origin_line: int = 0
    text_tokens: int = 0
    token_estimate: int = 0
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict, compare=False)  # fields of later versions


# ---- encoding (the writer) ----------------------------------------------------------------------

def message_to_json(message: Message) -> dict:
    content = []
    for segment in message.content:
        if isinstance(segment, MediaSegment):
            content.append({"media": segment.media})
        else:
            content.append({"text": segment.text, "ids": list(segment.ids)})
    return {"role": message.role, "content": content}


def media_to_json(item: MediaItem) -> dict:
    out = {"type": item.type, "member": item.member, "path": item.path, "bytes": item.bytes}
    for name in ("width", "height", "num_frames", "fps", "duration"):
        value = getattr(item, name)
        if value is not None:
            out[name] = value
    return out


def record_to_json(record: Record) -> dict:
    """The JSON object stored as `KEY.json` (without the media bytes)."""
    out = {
        "format_version": FORMAT_VERSION,
        "key": record.key,
        "source": record.source,
        "kind": record.kind,
        "origin": {"file": record.origin_file, "line": record.origin_line},
        "messages": [message_to_json(m) for m in record.messages],
        "media": [media_to_json(m) for m in record.media],
        "text_tokens": record.text_tokens,
        "token_estimate": record.token_estimate,
    }
    if record.kind == KIND_PAIR:
        out["chosen"] = [message_to_json(m) for m in record.chosen]
        out["rejected"] = [message_to_json(m) for m in record.rejected]
        out["margin"] = record.margin
    return out


def dumps_json(value: object) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces, UTF-8): equal input, equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_to_sample(record: Record) -> dict:
    """The webdataset sample dict {"__key__", "json", "0.jpg", ...} of a record with media data."""
    if "." in record.key:
        raise RecordFormatError(f"record key {record.key!r} must not contain a dot")
    sample: dict = {"__key__": record.key, JSON_MEMBER: dumps_json(record_to_json(record))}
    for index, item in enumerate(record.media):
        if item.data is None:
            raise RecordFormatError(f"record {record.key}: media {index} has no data")
        sample[item.member] = item.data
    return sample


# ---- decoding (the loader) ----------------------------------------------------------------------

def _fail(key: str, what: str) -> RecordFormatError:
    return RecordFormatError(f"shard sample {key!r}: {what}")


def _message_from_json(value: object, key: str, where: str, media_count: int) -> Message:
    if not isinstance(value, dict) or not isinstance(value.get("role"), str):
        raise _fail(key, f"{where} must be an object with a string 'role'")
    if value["role"] not in ROLES:
        raise _fail(key, f"{where}.role {value['role']!r} is not one of {ROLES}")
    content = value.get("content")
    if not isinstance(content, list):
        raise _fail(key, f"{where}.content must be a list")
    segments: list[Segment] = []
    for index, part in enumerate(content):
        if isinstance(part, dict) and isinstance(part.get("media"), int):
            if not 0 <= part["media"] < media_count:
                raise _fail(key, f"{where}.content[{index}] names media {part['media']}, "
                                 f"the record has {media_count}")
            segments.append(MediaSegment(media=part["media"]))
        elif (isinstance(part, dict) and isinstance(part.get("text"), str)
              and isinstance(part.get("ids"), list)):
            segments.append(TextSegment(text=part["text"], ids=tuple(int(i) for i in part["ids"])))
        else:
            raise _fail(key, f"{where}.content[{index}] is neither text+ids nor media")
    return Message(role=value["role"], content=tuple(segments))


def _messages(value: object, key: str, field_name: str, media_count: int) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise _fail(key, f"'{field_name}' must be a list of messages")
    return tuple(
        _message_from_json(m, key, f"{field_name}[{i}]", media_count) for i, m in enumerate(value)
    )


_KNOWN_FIELDS = {"format_version", "key", "source", "kind", "origin", "messages", "media",
                 "text_tokens", "token_estimate", "chosen", "rejected", "margin"}


def read_record(sample: dict) -> Record:
    """Parse a webdataset sample dict (raw bytes per member) into a Record with media bytes.

    Raises RecordFormatError naming the key and the missing or malformed field/member, so the
    loader can count and log the skip.
    """
    key = str(sample.get("__key__", "?"))
    raw = sample.get(JSON_MEMBER)
    if raw is None:
        raise _fail(key, f"has no '{JSON_MEMBER}' member (members: {sorted(sample)})")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise _fail(key, f"'{JSON_MEMBER}' member is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise _fail(key, "record must be a JSON object")
    version = value.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise _fail(key, f"format_version {version!r} is not supported (this reader: 1.."
                         f"{FORMAT_VERSION}); upgrade megatron-keye")
    kind = value.get("kind")
    if kind not in RECORD_KINDS:
        raise _fail(key, f"kind {kind!r} is not one of {RECORD_KINDS}")
    media_json = value.get("media", [])
    if not isinstance(media_json, list):
        raise _fail(key, "'media' must be a list")
    media = []
    for index, item in enumerate(media_json):
        if not isinstance(item, dict) or item.get("type") not in MEDIA_TYPES:
            raise _fail(key, f"media[{index}] must be an object with type image or video")
        member = item.get("member")
        if not isinstance(member, str) or member not in sample:
            raise _fail(key, f"media[{index}] member {member!r} is missing from the shard")
        data = sample[member]
        media.append(MediaItem(
            type=item["type"], member=member, path=str(item.get("path", "")),
            bytes=int(item.get("bytes", len(data))), width=item.get("width"),
            height=item.get("height"), num_frames=item.get("num_frames"), fps=item.get("fps"),
            duration=item.get("duration"), data=bytes(data),
        ))
    origin = value.get("origin") or {}
    pair = kind == KIND_PAIR
    return Record(
        key=key,
        source=str(value.get("source", "")),
        kind=kind,
        messages=_messages(value.get("messages"), key, "messages", len(media)),
        media=tuple(media),
        chosen=_messages(value.get("chosen"), key, "chosen", len(media)) if pair else (),
        rejected=_messages(value.get("rejected"), key, "rejected", len(media)) if pair else (),
        margin=value.get("margin") if pair else None,
        origin_file=str(origin.get("file", "")),
        origin_line=int(origin.get("line", 0)),
        text_tokens=int(value.get("text_tokens", 0)),
        token_estimate=int(value.get("token_estimate", 0)),
        format_version=version,
        extra={k: v for k, v in value.items() if k not in _KNOWN_FIELDS},
    )


# ---- the index ----------------------------------------------------------------------------------

@dataclass(kw_only=True, frozen=True)
class ShardInfo:
    file: str  # file name, relative to the index's directory
    samples: int
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class SourceStats:
    """Per-source totals over all shards (what blending and epoch-length planning need)."""

    samples: int = 0
    text_tokens: int = 0
    token_estimate: int = 0
    images: int = 0
    videos: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        self.samples += 1
        self.text_tokens += record.text_tokens
        self.token_estimate += record.token_estimate
        self.images += sum(m.type == MEDIA_IMAGE for m in record.media)
        self.videos += sum(m.type == MEDIA_VIDEO for m in record.media)
        self.kinds[record.kind] = self.kinds.get(record.kind, 0) + 1


@dataclass(kw_only=True)
class ShardIndex:
    name: str
    shards: list[ShardInfo]
    sources: dict[str, SourceStats]
    rejects: int = 0
    tokenizer_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def index_path(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"{name}.index.json"


def shard_file_name(name: str, number: int) -> str:
    return f"{name}-{number:06d}.tar"


def index_to_json(index: ShardIndex) -> dict:
    return {
        "format_version": index.format_version,
        "name": index.name,
        "shards": [vars(s) for s in index.shards],
        "sources": {k: vars(v) for k, v in sorted(index.sources.items())},
        "rejects": index.rejects,
        "tokenizer_sha256": index.tokenizer_sha256,
    }


def read_index(path: str | Path) -> ShardIndex:
    """Load `NAME.index.json`; a clear error names the file and the field."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"shard index {path} does not exist (preprocessing incomplete?)"
        ) from None
    except ValueError as error:
        raise ValueError(f"shard index {path} is not valid JSON: {error}") from None
    version = value.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"shard index {path}: format_version {version!r} is not supported")
    try:
        shards = [ShardInfo(file=s["file"], samples=int(s["samples"]), bytes=int(s["bytes"]),
                            sha256=s["sha256"]) for s in value["shards"]]
        sources = {k: SourceStats(**v) for k, v in value["sources"].items()}
    except (KeyError, TypeError) as error:
        raise ValueError(f"shard index {path}: malformed shards/sources ({error})") from None
    return ShardIndex(name=value.get("name", path.name.removesuffix(".index.json")),
                      shards=shards, sources=sources, rejects=int(value.get("rejects", 0)),
                      tokenizer_sha256=value.get("tokenizer_sha256", ""), format_version=version)


# ------------------------------------------------------------- reference log-prob sidecars
REFLOGP_VERSION = 1


class SidecarMismatch(ValueError):
    """A reference log-prob sidecar that does not fit the sample training renders."""


def reflogp_path(shard_path: str | Path, tag: str) -> Path:
    """The sidecar of `shard_path` for reference tag `tag` (NAME-000003.reflogp-TAG.npz)."""
    shard = Path(shard_path)
    stem = shard.name[:-4] if shard.name.endswith(".tar") else shard.name
    return shard.with_name(f"{stem}.reflogp-{tag}.npz")


def token_fingerprint(tokens) -> str:
    """A 64-bit hex digest of a sample's token ids (int64), keying its rendering."""
    import numpy as np

    data = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1)).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def write_reflogp(path: str | Path, entries: list[tuple[str, int, str, object]], *,
                  meta: dict) -> None:
    """Write a sidecar from (key, part, token fingerprint, float32 log-probs) entries, atomically
    (a temporary file renamed into place)."""
    import numpy as np

    path = Path(path)
    arrays = [np.asarray(e[3], dtype=np.float32).reshape(-1) for e in entries]
    offsets = np.zeros(len(entries) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.size for a in arrays]) if arrays else []
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, keys=np.array([e[0] for e in entries], dtype=str),
             parts=np.array([e[1] for e in entries], dtype=np.int64),
             tokens=np.array([e[2] for e in entries], dtype=str), offsets=offsets,
             logprobs=np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.float32),
             meta=np.array(json.dumps({"version": REFLOGP_VERSION, **meta}, sort_keys=True)))
    os.replace(tmp, path)


class ReflogpSidecar:
    """A sidecar read back: `lookup(key, part, tokens)` gives that sample's log-probs."""

    def __init__(self, path: str | Path):
        import numpy as np

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"data.ref_logprobs: no reference log-prob sidecar "
                                    f"{self.path} (run `megatron-keye reference-logprobs`)")
        with np.load(self.path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if int(meta.get("version", 0)) > REFLOGP_VERSION:
                raise SidecarMismatch(f"{self.path}: sidecar version {meta.get('version')} is "
                                      f"newer than this reader's {REFLOGP_VERSION}")
            self.meta = meta
            self.offsets = data["offsets"]
            self.logprobs = data["logprobs"]
            self.tokens = [str(t) for t in data["tokens"]]
            self.index = {(str(k), int(p)): i
                          for i, (k, p) in enumerate(zip(data["keys"], data["parts"], strict=True))}

    def lookup(self, key: str, part: int, tokens):
        """The float32 log-probs of sample (`key`, `part`) whose token ids are `tokens`."""
        where = self.index.get((key, part))
        if where is None:
            raise SidecarMismatch(f"sample {key} (part {part}): not in reference log-prob sidecar "
                                  f"{self.path} (made before the shard changed?)")
        start, end = int(self.offsets[where]), int(self.offsets[where + 1])
        length = len(tokens)
        if end - start != length:
            raise SidecarMismatch(f"sample {key} (part {part}): {length} tokens, but sidecar "
                                  f"{self.path} has {end - start} reference log-probs (another "
                                  f"template, media budget, seq_length or tokenizer?)")
        if token_fingerprint(tokens) != self.tokens[where]:
            raise SidecarMismatch(f"sample {key} (part {part}): its rendered tokens differ from "
                                  f"those sidecar {self.path} was computed on (another template "
                                  f"or tokenizer?)")
        return self.logprobs[start:end]
