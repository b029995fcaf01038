"""Log-probabilities and entropy of labels over a tensor-parallel (vocab-parallel) vocabulary.

Rank k of the TP group holds logits z_j for vocabulary columns j in [v_s, v_e). Per position:
m = max_j z_j (all-reduce MAX, no gradient), S = sum_j exp(z_j - m) (all-reduce SUM),
z_y = the label's logit (all-reduce SUM of the one rank that holds it),
log p_y = z_y - m - log S, and the entropy H = m + log S - sum_j p_j z_j.
Gradients: d log p_y / dz_j = 1[j=y] - p_j and dH/dz_j = -p_j (z_j - sum_k p_k z_k).

Unlike megatron-core's `vocab_parallel_cross_entropy` this never writes into its input: it works
on an fp32 copy (bf16 logits are read in fp32), so the caller may still use the logits (another
head term, the entropy, logging). Padded vocabulary columns (>= `vocab_size`) are excluded
explicitly, so they carry no mass even when a temperature turns their masked value into -inf.
Labels outside the vocabulary (-100 = ignore) give log p = 0 and must be masked by the caller.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _tp_group() -> dist.ProcessGroup | None:
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


class _VocabParallelLogProbsEntropy(torch.autograd.Function):
    """(log p(label), entropy) per position from vocab-parallel logits; out of place, fp32."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group):
        z = logits.float()  # a copy for bf16; the same tensor for fp32, never written below
        width = z.size(-1)
        columns = torch.arange(vocab_start, vocab_start + width, device=z.device)
        valid = columns < vocab_size if vocab_size is not None else torch.ones_like(columns,
                                                                                   dtype=torch.bool)
        neg_inf = torch.tensor(float("-inf"), device=z.device)
        z_valid = torch.where(valid, z, neg_inf)
        m = z_valid.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = z_valid - m.unsqueeze(-1)
        exp = shifted.exp()  # exactly 0 on padded columns
        sum_exp = exp.sum(dim=-1)
        pz = torch.where(valid, exp * z, torch.zeros_like(z)).sum(dim=-1)
        local_label = labels - vocab_start
        holds = (local_label >= 0) & (local_label < width)
        if vocab_size is not None:
            holds &= labels < vocab_size
        index = torch.where(holds, local_label, torch.zeros_like(local_label)).unsqueeze(-1)
        z_label = torch.where(holds, z.gather(-1, index).squeeze(-1), torch.zeros_like(m))
        if group is not None:
            packed = torch.stack([sum_exp, pz, z_label, holds.float()])
            dist.all_reduce(packed, group=group)
            sum_exp, pz, z_label, held = packed.unbind(0)
        else:
            held = holds.float()
        log_sum = sum_exp.log()
        mean_z = pz / sum_exp  # sum_j p_j z_j
        logp = torch.where(held > 0, z_label - m - log_sum, torch.zeros_like(m))
        entropy = m + log_sum - mean_z
        ctx.save_for_backward(z, valid, m, log_sum, mean_z, holds, index, held > 0)
        ctx.input_dtype = logits.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        z, valid, m, log_sum, mean_z, holds, index, in_vocab = ctx.saved_tensors
        z_valid = torch.where(valid, z, torch.full_like(z, float("-inf")))
        p = (z_valid - (m + log_sum).unsqueeze(-1)).exp()  # 0 on padded columns
        grad = torch.zeros_like(z)
        if grad_logp is not None:
            grad_logp = torch.where(in_vocab, grad_logp, torch.zeros_like(grad_logp))
            grad -= p * grad_logp.unsqueeze(-1)
            onehot = torch.zeros_like(z).scatter(-1, index, holds.float().unsqueeze(-1))
            grad += onehot * grad_logp.unsqueeze(-1)
        if grad_entropy is not None:
            centered = torch.where(valid, z - mean_z.unsqueeze(-1), torch.zeros_like(z))
            grad -= p * centered * grad_entropy.unsqueeze(-1)
        return grad.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    tp_rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), entropy), fp32, shaped like `labels`, from this rank's vocabulary slice.

    `logits` [..., V/tp] holds columns [tp_rank * V/tp, (tp_rank + 1) * V/tp) of the padded
    vocabulary (the model's vocab-parallel output); `vocab_size` is the real vocabulary, columns
    past it are excluded; `temperature` divides the logits first (sampling temperature).
    `group`/`tp_rank` default to megatron-core's tensor-parallel group and rank.
    Differentiable in `logits`; the input is never modified.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if group is None:
        group = _tp_group()
    if tp_rank is None:
        tp_rank = dist.get_rank(group) if group is not None else 0
    if temperature != 1.0:
        logits = logits.float() / temperature
    vocab_start = tp_rank * logits.size(-1)
    return _VocabParallelLogProbsEntropy.apply(logits, labels.long(), vocab_start, vocab_size,
                                               group)
