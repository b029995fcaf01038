#!/usr/bin/env python
"""The shard loader: samples/s and tokens/s of text, image and video (SlowFast) corpora with 2
workers next to the `small` flavor's training demand, and a training run fed by the real loader
vs by pre-materialized batches (see megatron_keye/bench/loader.py). Usage:
python tools/bench_loader.py [--seq 2048 --rows 12 --steps 4 --repeats 3]"""

from megatron_keye.bench.loader import main

if __name__ == "__main__":
    main()
