"""Thin launcher: parse the recipe and overrides, build the trainer, run it.

    torchrun --nproc-per-node 4 -m megatron_keye.train --recipe tiny-cpu-text --parallel.tensor=2
"""

from __future__ import annotations

import logging
import os
import sys

from megatron_keye.config import ConfigError, load_config, validate
from megatron_keye.config.arguments import split_recipe_args
from megatron_keye.logging_setup import configure_logging


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        recipe, overrides = split_recipe_args(argv if argv is not None else sys.argv[1:])
        config = load_config(recipe, overrides)
        validate(config, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))))
    except ConfigError as err:
        return _refuse(err)
    from megatron_keye.runtime.parallel import shutdown
    from megatron_keye.runtime.trainer import Trainer

    trainer = Trainer(config)
    try:
        trainer.setup()
    except (ConfigError, FileNotFoundError) as err:
        # what setup finds in the files a config names (a checkpoint that is not what the
        # field asks for, a missing prompts file): the same on every rank, said in one line
        logging.getLogger(__name__).debug("setup refused", exc_info=True)
        shutdown()
        return _refuse(err)
    try:
        trainer.run()
    finally:
        shutdown()
    return 0


def _refuse(err: Exception) -> int:
    """Every rank finds the same error; one of them says it, in one line."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
