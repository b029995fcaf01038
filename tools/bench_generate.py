#!/usr/bin/env python
"""Batched greedy generation with a KV cache vs transformers' generate on the same weights (see
megatron_keye/bench/generation.py). Usage: python tools/bench_generate.py [--batch 4 --new-tokens 64]"""

from megatron_keye.bench.generation import main

if __name__ == "__main__":
    main()
