#!/usr/bin/env python
"""Vision tower + projector images/s and visual tokens/s, forward and forward+backward, on packed
variable-resolution inputs, against transformers' SiglipVisionModel of the same size run one
resolution per call (see megatron_keye/bench/vision.py). Usage:
python tools/bench_vision.py [--flavor small --runs 3 --scale 1.0]"""

from megatron_keye.bench.vision import main

if __name__ == "__main__":
    main()
