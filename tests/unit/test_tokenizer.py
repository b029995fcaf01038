"""The Qwen2-style tokenizer wrapper, the shipped tiny tokenizer and the chat template."""

from __future__ import annotations

import collections
import json
import math

import pytest

from megatron_keye.data.text.synthetic_text import generate_documents
from megatron_keye.data.text.templates import CHAT_TEMPLATE, render_chat
from megatron_keye.data.text.tokenizer import (
    DEFAULT_TOKENIZER_DIR,
    OPTIONAL_SPECIAL_TOKENS,
    REQUIRED_SPECIAL_TOKENS,
    KeyeTokenizer,
    MissingSpecialTokenError,
)
from megatron_keye.data.text.tokenizer_build import (
    save_tokenizer_dir,
    train_tokenizer,
    training_corpus,
)


@pytest.fixture(scope="module")
def tokenizer():
    return KeyeTokenizer.default()


TEXTS = [
    "The hungry fox chases the hen behind the barn.",
    "Anna has 17 apples. She gives 5 to Ben, so Anna has twelve apples left.",
    "Unseen words still round-trip: Zürich, naïve, 東京, emoji 🎥, tabs\tand\nnewlines  ",
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_shipped_tokenizer_size_and_specials(tokenizer):
    assert 1000 <= tokenizer.vocab_size <= 2048
    ids = {token: tokenizer.special_token_id(token) for token in REQUIRED_SPECIAL_TOKENS}
    ids.update({token: tokenizer.special_token_id(token) for token in OPTIONAL_SPECIAL_TOKENS})
    assert len(set(ids.values())) == len(ids)
    # Specials follow the learned vocabulary (as in Qwen2, where they start at 151643).
    assert min(ids.values()) == tokenizer.vocab_size - len(ids)
    assert tokenizer.eos_id == ids["<|im_end|>"] and tokenizer.pad_id == ids["<|endoftext|>"]
    # A special token in text is one token; its text pieces are not.
    assert tokenizer.encode("<|frame|>") == [ids["<|frame|>"]]
    assert len(tokenizer.encode("<|frame")) > 1
    assert tokenizer.decode([ids["<think>"], ids["</think>"]], skip_special_tokens=True) == ""
    # The synthetic words are whole tokens: a sentence costs about one token per word.
    assert len(tokenizer.encode(TEXTS[0])) <= 12


def test_specials_are_resolved_by_content_not_position(tmp_path, tokenizer):
    """Put the specials first (ids 0..13) instead of last: the wrapper follows the file."""
    data = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_text())
    shift = len(data["added_tokens"])
    vocab = {token: index + shift for token, index in data["model"]["vocab"].items()}
    for new_id, entry in enumerate(data["added_tokens"]):
        entry["id"] = new_id
        vocab[entry["content"]] = new_id  # tokenizers keeps an added token's id from the vocab
    data["model"]["vocab"] = vocab
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    moved = KeyeTokenizer.from_dir(tmp_path)
    assert moved.special_token_id("<|endoftext|>") == 0
    assert moved.vision.video_pad == REQUIRED_SPECIAL_TOKENS.index("<|video_pad|>")
    text = "<|frame|>1.5<|video_pad|> the fox"
    assert moved.decode(moved.encode(text)) == text
    assert moved.encode(text) != tokenizer.encode(text)


def test_missing_special_token_is_named_with_the_file(tmp_path):
    data = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|fast_start|>"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MissingSpecialTokenError, match=r"<\|fast_start\|>.*") as error:
        KeyeTokenizer.from_file(path)
    assert str(path) in str(error.value)


def test_eos_and_pad_come_from_tokenizer_config(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((DEFAULT_TOKENIZER_DIR / name).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = KeyeTokenizer.from_dir(tmp_path)
    assert loaded.eos_id == loaded.special_token_id("<|endoftext|>")


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        KeyeTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        KeyeTokenizer.from_file(tmp_path / "tokenizer.json")


def test_transformers_loads_the_directory_identically(tokenizer):
    import transformers  # a hard dependency (setup.py): never skipped

    hf = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER_DIR))
    assert len(hf) == tokenizer.vocab_size
    assert hf.eos_token_id == tokenizer.eos_id and hf.pad_token_id == tokenizer.pad_id
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A fox."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And here?"}]},
    ]
    for add_generation_prompt in (False, True):
        rendered = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert rendered == render_chat(messages, add_generation_prompt=add_generation_prompt)
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(with_system, tokenize=False) == render_chat(with_system)
    assert render_chat(with_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert hf.chat_template == CHAT_TEMPLATE


def test_shipped_asset_is_what_the_builder_writes(tmp_path):
    """tools/build_tokenizer.py is deterministic and the committed files are its output."""
    save_tokenizer_dir(train_tokenizer(training_corpus()), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (DEFAULT_TOKENIZER_DIR / name).read_text()


def test_render_chat_refuses_malformed_messages():
    with pytest.raises(ValueError, match="message 0: needs a string 'role'"):
        render_chat([{"content": "hi"}])
    with pytest.raises(ValueError, match="part 0 must be text, image or video"):
        render_chat([{"role": "user", "content": [{"type": "audio"}]}])


def test_synthetic_text_is_deterministic_and_varied():
    first = generate_documents(50, seed=7)
    assert first == generate_documents(50, seed=7)
    assert first != generate_documents(50, seed=8)
    assert len(set(first)) == 50
    sentences = [s for doc in first for s in doc.split(". ")]
    assert len(set(sentences)) > 0.8 * len(sentences)
    with pytest.raises(ValueError, match="min_sentences"):
        generate_documents(1, seed=0, min_sentences=5, max_sentences=2)


def test_synthetic_text_has_learnable_but_not_periodic_structure(tokenizer):
    """Held-out bits per token: a bigram model gains a lot over unigrams, yet stays far from 0."""
    endoftext = tokenizer.special_token_id("<|endoftext|>")

    def stream(docs):
        ids = []
        for doc in docs:
            ids += tokenizer.encode(doc) + [endoftext]
        return ids

    train, test = stream(generate_documents(1000, seed=1)), stream(generate_documents(100, seed=2))
    vocab = tokenizer.vocab_size
    unigram = collections.Counter(train)
    following = collections.defaultdict(collections.Counter)
    for a, b in zip(train, train[1:]):
        following[a][b] += 1

    def p_unigram(token):
        return (unigram[token] + 1) / (len(train) + vocab)

    def p_bigram(prev, token, alpha=0.1):
        counts = following[prev]
        return (counts[token] + alpha * p_unigram(token)) / (sum(counts.values()) + alpha)

    unigram_bits = -sum(math.log2(p_unigram(t)) for t in test[1:]) / (len(test) - 1)
    bigram_bits = -sum(math.log2(p_bigram(a, b)) for a, b in zip(test, test[1:])) / (len(test) - 1)
    assert unigram_bits - bigram_bits > 2.5  # measured: 7.1 -> 3.7 bits with more data
    assert bigram_bits > 2.0  # far from a memorizable, periodic text
