"""Build the tiny tokenizer shipped in megatron_keye/data/text/assets/tiny_tokenizer.

    python tools/build_tokenizer.py [--out DIR] [--vocab-size N] [--documents N] [--seed N]

Trains byte-level BPE (Qwen2 pre-tokenizer) on the deterministic synthetic corpus, appends the
Keye-VL-1.5 special tokens and writes tokenizer.json + tokenizer_config.json. Same arguments, same
files.
"""

from __future__ import annotations

import argparse

from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR, KeyeTokenizer
from megatron_keye.data.text.tokenizer_build import (
    TINY_VOCAB_SIZE,
    save_tokenizer_dir,
    train_tokenizer,
    training_corpus,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_TOKENIZER_DIR))
    parser.add_argument("--vocab-size", type=int, default=TINY_VOCAB_SIZE)
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    texts = training_corpus(num_documents=args.documents, seed=args.seed)
    directory = save_tokenizer_dir(train_tokenizer(texts, vocab_size=args.vocab_size), args.out)
    tokenizer = KeyeTokenizer.from_dir(directory)
    print(
        f"wrote {directory}: {tokenizer.vocab_size} tokens, eos {tokenizer.eos_id}, "
        f"pad {tokenizer.pad_id}"
    )


if __name__ == "__main__":
    main()
