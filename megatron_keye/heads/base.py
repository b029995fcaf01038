"""The loss-head interface: what the last pipeline stage does with the model's output.

Pretraining, SFT, preference (DPO/BCO/MPO), reward and RL (GSPO) objectives differ only here, so
the trainer, the schedules and the parallel runtime never change between stages. A head returns
the *sum* of its per-token (or per-sample) losses and the number of units it was summed over;
the trainer divides once per global batch by that count all-reduced over data×context ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

# A report maps a metric name to a [sum, count] tensor; the trainer adds them over micro-batches
# and data-parallel ranks and logs sum / count.
Report = dict[str, torch.Tensor]


class LossHead(Protocol):
    """Turns the last stage's output and the batch into (loss sum, valid count, report)."""

    name: str

    def __call__(
        self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        """`output` is vocab-parallel logits [s, b, padded_vocab/tp] whose padding columns are
        masked (never take a softmax's mass); the count is an int tensor."""
        ...


_REGISTRY: dict[str, type] = {}


def register_loss_head(name: str):
    """Class decorator making a head selectable by `stage.loss_head: <name>`."""

    def wrap(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def build_loss_head(name: str, **kwargs) -> LossHead:
    """Instantiate the registered head `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"stage.loss_head: unknown head {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def report_entry(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A detached [sum, count] pair for a report."""
    return torch.stack([total.detach().float(), count.detach().float()])
