#!/usr/bin/env python
"""SFT and MPO steps next to the LM step on the same tokens, TP=1 and TP=2 (see
megatron_keye/bench/posttrain.py). Usage: python tools/bench_posttrain.py [--seq 1024 --repeats 5]"""

from megatron_keye.bench.posttrain import main

if __name__ == "__main__":
    main()
