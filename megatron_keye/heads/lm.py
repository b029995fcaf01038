"""Next-token cross-entropy over a vocab-parallel output layer (pretraining and SFT)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from megatron.core import tensor_parallel

from megatron_keye.heads.base import Report, register_loss_head, report_entry


@register_loss_head("lm")
class LanguageModelLoss:
    """Sum of -log p(label) over tokens with `loss_weights` = 1.

    The batch carries `labels` [b, s] (already shifted: labels[t] is the token after t) and
    `loss_weights` [b, s]. Masked positions may hold any in-vocabulary label.

    The logits are vocab-parallel over the padded vocabulary, with the columns past
    `model.vocab_size` already at the dtype's most negative value (`Qwen3LanguageModel.forward`
    masks them on the rank that holds them), so exp() of them is exactly 0 in the softmax's sum
    and the loss equals the unpadded model's (tested against transformers at TP=2×PP=2).
    """

    name = "lm"

    def __call__(
        self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        labels = batch["labels"].transpose(0, 1).contiguous()
        mask = batch["loss_weights"].transpose(0, 1).float()
        # vocab_parallel_cross_entropy rewrites fp32 logits in place; this head owns them.
        per_token = tensor_parallel.vocab_parallel_cross_entropy(output.float(), labels)
        total = (per_token * mask).sum()
        count = mask.sum().to(torch.int)
        return total, count, {"lm loss": report_entry(total, count)}
