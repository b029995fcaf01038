"""The collective helpers now live in `megatron_keye/ops/collectives.py` (loss heads use them,
and heads sit below the runtime); this name stays so existing imports keep working."""

from megatron_keye.ops.collectives import (  # noqa: F401
    all_reduce_values,
    comm_device,
    sum_over_group,
)
