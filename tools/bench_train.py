#!/usr/bin/env python
"""One training step of the `small` flavor vs transformers' Qwen3ForCausalLM (see
megatron_keye/bench/train_step.py). Usage: python tools/bench_train.py [--seq 2048 --repeats 5]"""

from megatron_keye.bench.train_step import main

if __name__ == "__main__":
    main()
