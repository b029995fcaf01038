"""Parallelism planner: memory, communication and step time of TP/CP/PP/DP layouts.

`plan(PlanInputs(...))` ranks layouts; `predict_memory` gives one layout's per-rank memory
breakdown (for benchmarks comparing prediction with measurement); `cli_main` is
`megatron-keye plan` and `tools/plan_parallel.py`.
"""

from megatron_keye.planning.cli import cli_main
from megatron_keye.planning.comm import CommEstimate, RingCheck, estimate_comm
from megatron_keye.planning.components import CALIBRATION
from megatron_keye.planning.layout import Cluster, Layout, candidate_layouts, layout_problems
from megatron_keye.planning.memory import (
    MemoryBreakdown,
    predict_memory,
    predicted_activation_bytes,
)
from megatron_keye.planning.plan import LayoutEstimate, PlanInputs, PlanResult, evaluate, plan
from megatron_keye.planning.shapes import ModelShape, model_config, model_flops_per_token
from megatron_keye.planning.vision import VisionShape

__all__ = [
    "CALIBRATION",
    "Cluster",
    "CommEstimate",
    "Layout",
    "LayoutEstimate",
    "MemoryBreakdown",
    "ModelShape",
    "PlanInputs",
    "PlanResult",
    "RingCheck",
    "VisionShape",
    "candidate_layouts",
    "cli_main",
    "estimate_comm",
    "evaluate",
    "layout_problems",
    "model_config",
    "model_flops_per_token",
    "plan",
    "predict_memory",
    "predicted_activation_bytes",
]
