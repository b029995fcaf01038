#!/usr/bin/env python
"""Convert Qwen3ForCausalLM checkpoints between Hugging Face safetensors and native format.

  python tools/convert_checkpoint.py import --hf-dir HF --out CKPT [--tensor 2 --pipeline 2]
  python tools/convert_checkpoint.py export --checkpoint CKPT --out HF [--tokenizer DIR]

Same as `megatron-keye convert ...`; the logic lives in megatron_keye/convert.py.
"""

import sys

from megatron_keye.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
