"""The loss-head interface: what the last pipeline stage does with the model's output.

Pretraining, SFT, preference (DPO/BCO/MPO), reward and RL (GSPO) objectives differ only here, so
the trainer, the schedules and the parallel runtime never change between stages. A head returns
the *sum* of its per-unit losses (tokens, pairs, samples) and the number of units it was summed
over; the trainer divides once per global batch by that count all-reduced over data×context
ranks (megatron's per-token mode, so the count is an int tensor).

A head also declares what it needs (`HeadNeeds`): vocab-parallel logits or the final hidden
states, reference log-probs, per-sample segment ids, pair roles. It reads its own typed option
section of `stage.head` (`config/schema.py::HeadConfig`, named by `config_section`).

Heads whose loss mixes units (MPO: pairs and tokens) or whose weights depend on the whole global
batch (SFT `sample`/`square`) get global normalizers before the micro-batch loop:
`batch_statistics(micro_batch)` returns sums computed from the *unsplit* micro-batch on the CPU,
the model step adds them over micro-batches and data-parallel ranks and hands the totals to
`begin_step`. Heads with running state (BCO's reward shift δ) update it in `end_step` from the
global reports and expose `state_dict`/`load_state_dict`, which the checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

# A report maps a metric name to a [sum, count] tensor; the trainer adds them over micro-batches
# and data-parallel ranks and logs sum / count.
Report = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class HeadNeeds:
    """What a head needs from the model step and the batch."""

    # logits: vocab-parallel logits [s, b, padded_vocab/tp] (padding columns masked);
    # hidden: the final (normed) hidden states [s(/tp under SP), b, h];
    # scores: per-token fp32 scores [s, b] of the model's value head (model.output_head=value).
    output: Literal["logits", "hidden", "scores"] = "logits"
    reference_logprobs: bool = False  # the batch's `ref_logprobs` (precomputed or a frozen model)
    sample_ids: bool = False  # `sample_ids`: per-sample segment ids of packed rows
    pair_roles: bool = False  # `pair_role`: chosen (1) / rejected (2) per token


class LossHead(Protocol):
    """Turns the last stage's output and the batch into (loss sum, valid count, report)."""

    name: str
    needs: HeadNeeds

    def __call__(
        self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        """`output` is what `needs.output` names; the count is an int tensor."""
        ...


class HeadBase:
    """Defaults for the optional parts of the interface; concrete heads subclass it."""

    name: ClassVar[str] = ""
    needs: ClassVar[HeadNeeds] = HeadNeeds()
    config_section: ClassVar[str | None] = None  # attribute of `stage.head` this head reads

    def __init__(self, *, config: Any = None, vocab_size: int | None = None):
        self.config = config
        self.vocab_size = vocab_size  # real vocabulary: logit columns past it are padding
        # A frozen reference model on the policy's layout fills `ref_logprobs` each step when
        # True (the trainer builds it from `reference_load`, else `checkpoint.load`).
        self.uses_reference_model = False
        self.reference_load: str | None = None

    def batch_statistics(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Sums over one unsplit micro-batch that the head needs for the whole global batch."""
        return {}

    def begin_step(self, statistics: Mapping[str, float]) -> None:
        """Receive `batch_statistics` summed over the global batch (every rank: same values)."""

    def end_step(self, reports: Mapping[str, tuple[float, float]], *, training: bool) -> None:
        """See the global [sum, count] reports of a finished step (e.g. update running stats)."""

    def state_dict(self) -> dict[str, Any]:
        """Running state to checkpoint (plain Python numbers; identical on every rank)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
        if state:
            raise ValueError(f"loss head {self.name!r} has no state but the checkpoint holds "
                             f"{sorted(state)}")


_REGISTRY: dict[str, type] = {}


def register_loss_head(name: str):
    """Class decorator making a head selectable by `stage.loss_head: <name>`."""

    def wrap(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def registered_heads() -> list[str]:
    """Names `stage.loss_head` accepts."""
    return sorted(_REGISTRY)


def build_loss_head(name: str, *, head_config: Any = None, vocab_size: int | None = None,
                    **kwargs) -> LossHead:
    """Instantiate the registered head `name`.

    `head_config` is `stage.head` (config/schema.py::HeadConfig); a head with a
    `config_section` receives that section as `config=`, built with defaults when absent.
    `HeadBase` heads also get the real `vocab_size` (`model.vocab_size`).
    """
    if name not in _REGISTRY:
        raise ValueError(f"stage.loss_head: unknown head {name!r}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[name]
    if issubclass(cls, HeadBase):
        kwargs.setdefault("vocab_size", vocab_size)
    section = getattr(cls, "config_section", None)
    if section is not None and "config" not in kwargs:
        if head_config is None:
            from megatron_keye.config.schema import HeadConfig

            head_config = HeadConfig()
        if not hasattr(head_config, section):
            raise ValueError(f"stage.head.{section}: missing option section for head {name!r}")
        kwargs["config"] = getattr(head_config, section)
    return cls(**kwargs)


def head_needs(head: Any) -> HeadNeeds:
    """A head's declared needs (heads written before `HeadNeeds` need logits only)."""
    return getattr(head, "needs", None) or HeadNeeds()


def report_entry(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A detached [sum, count] pair for a report."""
    return torch.stack([total.detach().float().reshape(()),
                        count.detach().float().to(total.device).reshape(())])
