#!/usr/bin/env python
"""Merge native checkpoints (same as `megatron-keye merge`); `--help` lists the options.

    python tools/merge_models.py --method ties --base PRE --model SFT_A --model SFT_B \
        --weights 1 0.5 --density 0.2 --out MERGED
"""

import sys

from megatron_keye.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
