#!/usr/bin/env python
"""One GSPO iteration by phase (rollout, reward, log-prob, update) on the small flavor, with
rollout tokens/s vs transformers' generate and the update vs SFT steps on the same tokens (see
megatron_keye/bench/rl.py). Usage: python tools/bench_rl.py [--prompts 4 --group-size 4]"""

from megatron_keye.bench.rl import main

if __name__ == "__main__":
    main()
