"""Write the demo's synthetic multimodal corpus (JSONL per source + media) into a directory.

    python tools/make_demo_corpus.py OUT_DIR [--seed 7]

Logic: megatron_keye/data/demo_corpus.py (the demo calls the same function).
"""

from __future__ import annotations

import argparse
import logging

from megatron_keye.data.demo_corpus import DemoCorpusConfig, write_demo_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=DemoCorpusConfig().seed)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = write_demo_corpus(args.out_dir, DemoCorpusConfig(seed=args.seed))
    for name, path in corpus.files.items():
        print(f"{name:<14} {path}")
    print(f"media root     {corpus.media_root}")


if __name__ == "__main__":
    main()
