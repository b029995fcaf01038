"""Process-wide logging: our INFO on rank 0, warnings elsewhere, megatron-core's chatter muted."""

from __future__ import annotations

import logging
import os
import warnings

_NOISE = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*reduce_scatter_tensor. is deprecated.*",
    ".*all_gather_into_tensor. is deprecated.*",
    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*",
    # torch.distributed.checkpoint deprecations reached through megatron-core 0.16.1
    ".*`load_state_dict` is deprecated and will be removed.*",
    ".*Please use DTensor instead and we are deprecating ShardedTensor.*",
)


def configure_logging() -> None:
    """Call once at the start of a command."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
