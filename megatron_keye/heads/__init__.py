"""Loss heads: the objectives the trainer can optimize, selected by `stage.loss_head`."""

from megatron_keye.heads import lm  # noqa: F401  (registers "lm")
from megatron_keye.heads.base import LossHead, Report, build_loss_head, register_loss_head

__all__ = ["LossHead", "Report", "build_loss_head", "register_loss_head"]
