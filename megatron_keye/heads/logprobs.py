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
    def forward(ctx, logits, labels, vocab_start, vocab_size, group, with_entropy):
        z = logits.float()  # a copy for bf16; the same tensor for fp32, never written below
        width = z.size(-1)
        padded = vocab_size is not None and vocab_start + width > vocab_size
        if padded:  # padded columns: -inf, so exp() gives exactly 0
            columns = torch.arange(vocab_start, vocab_start + width, device=z.device)
            valid = columns < vocab_size
            z_valid = z.masked_fill(~valid, float("-inf"))
        else:
            valid, z_valid = None, z
        m = z_valid.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        exp = (z_valid - m.unsqueeze(-1)).exp()
        sum_exp = exp.sum(dim=-1)
        if with_entropy:
            weighted = exp * z if valid is None else (exp * z).masked_fill(~valid, 0.0)
            pz = weighted.sum(dim=-1)
        else:
            pz = torch.zeros_like(m)
        del exp
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
        if not with_entropy:
            entropy = torch.zeros_like(m)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(z, m + log_sum, mean_z, holds, index, held > 0)
        ctx.valid, ctx.input_dtype = valid, logits.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        z, log_normalizer, mean_z, holds, index, in_vocab = ctx.saved_tensors
        valid = ctx.valid
        z_valid = z if valid is None else z.masked_fill(~valid, float("-inf"))
        p = (z_valid - log_normalizer.unsqueeze(-1)).exp()  # 0 on padded columns
        scale = torch.zeros_like(log_normalizer)
        if grad_logp is not None:
            grad_logp = torch.where(in_vocab, grad_logp.float(), torch.zeros_like(scale))
            scale = scale - grad_logp
        if grad_entropy is not None:
            # dH/dz_j = -p_j (z_j - sum_k p_k z_k)
            centered = z - mean_z.unsqueeze(-1)
            if valid is not None:
                centered = centered.masked_fill(~valid, 0.0)
            grad = p * (scale.unsqueeze(-1) - centered * grad_entropy.float().unsqueeze(-1))
        else:
            grad = p * scale.unsqueeze(-1)
        if grad_logp is not None:  # + 1[j = label] on the rank that holds the label
            grad.scatter_add_(-1, index, (holds.float() * grad_logp).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    tp_rank: int | None = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), entropy), fp32, shaped like `labels`, from this rank's vocabulary slice.

    `logits` [..., V/tp] holds columns [tp_rank * V/tp, (tp_rank + 1) * V/tp) of the padded
    vocabulary (the model's vocab-parallel output); `vocab_size` is the real vocabulary, columns
    past it are excluded; `temperature` divides the logits first (sampling temperature).
    `group`/`tp_rank` default to megatron-core's tensor-parallel group and rank.
    Differentiable in `logits`; the input is never modified. `with_entropy=False` skips the
    entropy's extra pass over the vocabulary (its output is then zeros, not differentiable).
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
                                               group, with_entropy)
