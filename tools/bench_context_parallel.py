#!/usr/bin/env python
"""Context parallelism: per-rank activation memory, weights+optimizer and step time of the
`tiny`/`small` flavors vs sequence length at CP=1, 2, 4 with recompute off and on (see
megatron_keye/bench/context_parallel.py). Usage:
python tools/bench_context_parallel.py [--flavor tiny --max-seq 65536 --recompute none,full]"""

from megatron_keye.bench.context_parallel import main

if __name__ == "__main__":
    main()
