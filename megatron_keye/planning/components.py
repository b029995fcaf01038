"""Activation components: one kind of tensor saved for backward, counted per token (or patch).

Shared by the decoder's activation model (`memory.py`) and the vision tower's (`vision.py`).
`CALIBRATION` multiplies a component by name (default 1.0); a benchmark that measures another
stack (TE's fused norms, say) sets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_keye.planning.layout import Layout

# Multiplier per activation component (see module docstring). 1.0 = as derived from the code.
CALIBRATION: dict[str, float] = {}

_BYTES = {"act": None, "fp32": 4, "int64": 8}


@dataclass(kw_only=True, frozen=True)
class Component:
    """One saved tensor kind: `elements` per token, its dtype and sharding."""

    name: str
    elements: float
    dtype: str  # "act" | "fp32" | "int64"
    shard: str  # "tp" | "sp" | "none"


def component_bytes(c: Component, layout: Layout, *, tokens: float, precision: str) -> float:
    """Bytes of one component for `tokens` tokens of one micro-batch (before CP division):
    "tp" components split over TP, "sp" ones over TP under sequence parallelism, all over CP."""
    size = _BYTES[c.dtype] or (4 if precision == "fp32" else 2)
    div = layout.cp
    if c.shard == "tp" or (c.shard == "sp" and layout.sequence_parallel):
        div *= layout.tp
    return CALIBRATION.get(c.name, 1.0) * c.elements * size * tokens / div
