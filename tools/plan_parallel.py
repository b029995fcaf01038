#!/usr/bin/env python
"""Parallelism planner (same as `megatron-keye plan`); `--help` lists the inputs.

    python tools/plan_parallel.py --flavor 8b --seq 131072 --gpus 8 --gpu H100
    python tools/plan_parallel.py --flavor 8b --seq 8192 --gpus 32 --json
"""

import sys

from megatron_keye.planning import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:], prog="tools/plan_parallel.py"))
