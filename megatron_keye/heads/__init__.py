"""Loss heads: the objectives the trainer can optimize, selected by `stage.loss_head`."""

from megatron_keye.heads import gspo, lm, preference, reward, sft  # noqa: F401  (register lm, sft, dpo, mpo, reward, gspo)
from megatron_keye.heads.base import (
    HeadBase,
    HeadNeeds,
    LossHead,
    Report,
    build_loss_head,
    register_loss_head,
    registered_heads,
)

__all__ = ["HeadBase", "HeadNeeds", "LossHead", "Report", "build_loss_head",
           "register_loss_head", "registered_heads"]
