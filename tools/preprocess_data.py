#!/usr/bin/env python
"""Preprocess JSONL corpora and media into WebDataset shards (same as `megatron-keye preprocess`).

    python tools/preprocess_data.py --input chat=data/chat.jsonl --input data/captions.jsonl \
        --media-root data/media --output-dir shards/ --name train --workers 8
"""

import sys

from megatron_keye.data.shards.writer import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
