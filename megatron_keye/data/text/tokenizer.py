"""Qwen2-style byte-level BPE tokenizer (a `tokenizer.json`) with Keye-VL-1.5's special tokens.

Special tokens are looked up by their text in the file, never by a hard-coded id: the real
Keye-VL-1.5 tokenizer has the Qwen2 ones at 151643+ and the ids of the tokens new in 1.5
(`<|frame|>`, `<|fast_start|>`, `<|fast_end|>`) are unconfirmed, while the tiny tokenizer shipped
here for tests and demos has them after its 1,284 learned tokens. A directory is loaded from
`tokenizer.json` plus, when present, `tokenizer_config.json` for the eos/pad tokens (Qwen2 chat
models end turns with `<|im_end|>` and pad with `<|endoftext|>`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
FRAME = "<|frame|>"
FAST_START = "<|fast_start|>"
FAST_END = "<|fast_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
POLYGON_START = "<|polygon_start|>"
POLYGON_END = "<|polygon_end|>"

REQUIRED_SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
    FRAME,
    FAST_START,
    FAST_END,
    THINK_START,
    THINK_END,
)
# Used by grounding data in the paper; not needed to encode images or videos.
OPTIONAL_SPECIAL_TOKENS = (POLYGON_START, POLYGON_END)

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"


class MissingSpecialTokenError(ValueError):
    """The tokenizer file has no token with the required text."""


@dataclass(kw_only=True, frozen=True)
class VisionTokenIds:
    """Ids of the tokens that mark images and videos in the text."""

    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    frame: int
    fast_start: int
    fast_end: int


def _token_text(value: object) -> str | None:
    """A token in tokenizer_config.json is a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class KeyeTokenizer:
    """Encode/decode text and resolve Keye-VL special tokens by content."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        source: str,
        eos_token: str = IM_END,
        pad_token: str = ENDOFTEXT,
        required_special_tokens: tuple[str, ...] = REQUIRED_SPECIAL_TOKENS,
    ):
        self._tokenizer = tokenizer
        self.source = source
        for token in required_special_tokens:
            self.special_token_id(token)
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_id = self.special_token_id(eos_token)
        self.pad_id = self.special_token_id(pad_token)
        self.vision = VisionTokenIds(
            vision_start=self.special_token_id(VISION_START),
            vision_end=self.special_token_id(VISION_END),
            image_pad=self.special_token_id(IMAGE_PAD),
            video_pad=self.special_token_id(VIDEO_PAD),
            frame=self.special_token_id(FRAME),
            fast_start=self.special_token_id(FAST_START),
            fast_end=self.special_token_id(FAST_END),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> KeyeTokenizer:
        """Load a `tokenizer.json` file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # the tokenizers library raises a bare Exception
            raise ValueError(f"tokenizer file {path} cannot be read: {error}") from error
        return cls(tokenizer, source=path, **kwargs)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> KeyeTokenizer:
        """Load a tokenizer directory (a Hugging Face model directory works).

        eos/pad come from `tokenizer_config.json` when it names them, else <|im_end|> /
        <|endoftext|>.
        """
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer directory {directory} has no tokenizer.json")
        kwargs = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_file} is not valid JSON: {error}") from error
            for field in ("eos_token", "pad_token"):
                text = _token_text(config.get(field))
                if text is not None:
                    kwargs[field] = text
        return cls.from_file(file, **kwargs)

    @classmethod
    def default(cls) -> KeyeTokenizer:
        """The tiny tokenizer shipped with the package (1,298 tokens, for tests and demos)."""
        return cls.from_dir(DEFAULT_TOKENIZER_DIR)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def special_token_id(self, token: str) -> int:
        """Id of a token by its text; MissingSpecialTokenError naming the token and the file."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise MissingSpecialTokenError(
                f"tokenizer {self.source} has no token {token!r}; Keye-VL-1.5 needs "
                f"{', '.join(REQUIRED_SPECIAL_TOKENS)}"
            )
        return token_id

    def has_token(self, token: str) -> bool:
        return self._tokenizer.token_to_id(token) is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their special ids."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts (parallel in the tokenizers library)."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of token ids (byte-level BPE round-trips any text exactly)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)
