"""Train and save a small Qwen2-style tokenizer (what `tools/build_tokenizer.py` runs).

The tokenizer is byte-level BPE with Qwen2's pieces: NFC normalization, the Qwen2 split regex
(contractions, letter runs with one leading non-letter, single digits, punctuation runs, newlines,
spaces) followed by the byte-to-unicode mapping, and the byte-level decoder. It is trained on the
deterministic synthetic corpus plus a few chat phrases, then the special tokens are appended after
the learned ones (as in Qwen2, where they follow the regular vocabulary). Training is
deterministic: the same corpus and vocabulary size give the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from megatron_keye.data.text.synthetic_text import generate_documents
from megatron_keye.data.text.templates import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT
from megatron_keye.data.text.tokenizer import (
    ENDOFTEXT,
    IM_END,
    OPTIONAL_SPECIAL_TOKENS,
    REQUIRED_SPECIAL_TOKENS,
)

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = REQUIRED_SPECIAL_TOKENS + OPTIONAL_SPECIAL_TOKENS
TINY_VOCAB_SIZE = 2048  # the tiny/small model flavors' embedding size: an upper bound

# Phrases the demos put around the synthetic text (prompts, answers), so they tokenize compactly.
CHAT_PHRASES = (
    DEFAULT_SYSTEM_PROMPT,
    "Describe the video.",
    "Describe the image.",
    "What happens in the video?",
    "What is in the picture?",
    "Answer the question.",
    "The video shows",
    "The image shows",
    "Let me think about it step by step.",
    "user\nassistant\nsystem\n",
)


def new_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the Qwen2 normalizer, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def training_corpus(*, num_documents: int = 20000, seed: int = 1234) -> list[str]:
    """The synthetic documents and chat phrases the tiny tokenizer is trained on."""
    return generate_documents(num_documents, seed=seed) + list(CHAT_PHRASES) * 50


def train_tokenizer(texts: list[str], *, vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE over `texts`; total size (specials included) at most `vocab_size`."""
    learned = vocab_size - len(SPECIAL_TOKENS)
    if learned <= 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the 256 byte tokens")
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def tokenizer_config(*, eos_token: str = IM_END, pad_token: str = ENDOFTEXT) -> dict:
    """`tokenizer_config.json` so `transformers.AutoTokenizer` loads the directory."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
    }


def save_tokenizer_dir(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"), pretty=True)
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False)
    (directory / "tokenizer_config.json").write_text(config + "\n")
    return directory
