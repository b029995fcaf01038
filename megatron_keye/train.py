"""Thin launcher: parse the recipe and overrides, build the trainer, run it.

    torchrun --nproc-per-node 4 -m megatron_keye.train --recipe tiny-cpu-text --parallel.tensor=2
"""

from __future__ import annotations

import sys

from megatron_keye.config import load_config
from megatron_keye.logging_setup import configure_logging


def main(argv: list[str] | None = None) -> int:
    from megatron_keye.cli import split_recipe_args

    configure_logging()
    recipe, overrides = split_recipe_args(argv if argv is not None else sys.argv[1:])
    config = load_config(recipe, overrides)
    from megatron_keye.runtime.parallel import shutdown
    from megatron_keye.runtime.trainer import Trainer

    try:
        Trainer(config).setup().run()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
