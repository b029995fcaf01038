"""GSPO / GSPO-token / GRPO: an independent plain-torch reference and the spawned-rank workers.

The reference is written from the formulas (Zheng et al. 2025; DeepSeekMath for GRPO; veRL's
clamps) with explicit loops over rows and samples; it shares no code with megatron_keye/heads/.
"""

from __future__ import annotations

import torch

from tests.distributed.workers import build_trainer, tiny_config
from tests.distributed.workers_heads import reference_token_logprobs, run_head_case


def _clip_term(ratio, adv, low, high):
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))


def reference_policy_loss(logits, batch, vocab: int, case: dict) -> torch.Tensor:
    """The head's loss over the whole global batch, sample by sample."""
    variant = case.get("variant", "gspo")
    low, high = case.get("clip_low", 3e-4), case.get("clip_high", 4e-4)
    beta, agg = case.get("kl_coef", 0.0), case.get("loss_agg", "seq-mean-token-mean")
    logp, _ = reference_token_logprobs(logits, batch["labels"], vocab)
    trained = (batch["loss_weights"] != 0) & (batch["labels"] != -100)
    sample_losses, token_sum, tokens = [], 0.0, 0
    for row in range(logp.shape[0]):
        for sample in batch["sample_ids"][row].unique().tolist():
            where = ((batch["sample_ids"][row] == sample) & trained[row]).nonzero().flatten()
            if where.numel() == 0:
                continue
            lp = logp[row, where]
            old = batch["old_logprobs"][row, where]
            adv = batch["advantages"][row, where]
            n = where.numel()
            if beta:
                d = (batch["ref_logprobs"][row, where] - lp).clamp(-10, 10)
                kl = (torch.exp(d) - d - 1).clamp(-10, 10)
            else:
                kl = torch.zeros_like(lp)
            if variant == "gspo":
                s = torch.exp(torch.clamp((lp - old).mean(), max=10.0))
                term = _clip_term(s, adv.mean(), low, high)
                per_token = term.expand(n) + beta * kl
            elif variant == "gspo_token":
                log_s = torch.clamp((lp - old).mean(), max=10.0).detach()
                s_t = torch.exp(lp - lp.detach() + log_s)
                per_token = _clip_term(s_t, adv, low, high) + beta * kl
            else:
                r = torch.exp((lp - old).clamp(-20, 20))
                per_token = _clip_term(r, adv, low, high) + beta * kl
            sample_losses.append(per_token.mean())
            token_sum = token_sum + per_token.sum()
            tokens += n
    if agg == "seq-mean-token-mean":
        return torch.stack(sample_losses).mean()
    return token_sum / tokens


def make_policy_head(case: dict, vocab: int):
    from megatron_keye.config.schema import HeadConfig, PolicyGradientHeadConfig
    from megatron_keye.heads import build_loss_head

    options = {k: v for k, v in case.items() if k != "head"}
    return build_loss_head("gspo", head_config=HeadConfig(gspo=PolicyGradientHeadConfig(**options)),
                           vocab_size=vocab)


def gspo_reference_worker(*, weights: dict, batch: dict, cases: dict) -> dict:
    """Single process: per case the formula's loss and gradients; and the head itself with
    pi_old = pi (its log-probs computed by the same forward)."""
    from megatron_keye.heads.logprobs import vocab_parallel_logprobs
    from megatron_keye.models.keye_vl.builder import (
        build_model_chunks,
        load_full_state,
        named_parameters_global,
    )
    from megatron_keye.runtime.parallel import ParallelDims

    config = tiny_config({})
    ParallelDims.from_config(config.parallel, 1).initialize(seed=config.seed)
    (chunk,) = build_model_chunks(config, torch.device("cpu"))
    load_full_state([chunk], weights)
    logits = chunk(batch["tokens"], batch["position_ids"], segments=batch["sample_ids"])
    names, params = zip(*named_parameters_global(chunk).items(), strict=True)
    vocab = config.model.vocab_size
    out = {}
    for name, case in cases.items():
        loss = reference_policy_loss(logits, batch, vocab, case)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        out[name] = {"loss": loss.item(), "grads": dict(zip(names, grads, strict=True))}
    own, _ = vocab_parallel_logprobs(logits.detach(), batch["labels"].T, vocab_size=vocab)
    out["logprobs"] = own.T.contiguous()
    same = {**batch, "old_logprobs": out["logprobs"]}
    for variant in ("gspo", "gspo_token", "grpo"):
        head = make_policy_head({"variant": variant}, vocab)
        total, count, report = head(logits.detach(), same)
        out[f"on_policy_{variant}"] = {k: (v[0] / v[1]).item() for k, v in report.items()}
    # Uniform advantages (each sample's mean): the production GSPO and GSPO-token heads, loss
    # and gradient with respect to the logits.
    uniform = {**batch, "advantages": _sample_means(batch["advantages"], batch["sample_ids"])}
    for variant in ("gspo", "gspo_token"):
        leaf = logits.detach().clone().requires_grad_(True)
        total, count, _ = make_policy_head({"variant": variant}, vocab)(leaf, uniform)
        (grad,) = torch.autograd.grad(total / count, leaf)
        out[f"uniform_{variant}"] = {"loss": (total / count).item(), "grad": grad}
    return out


def _sample_means(values: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    out = values.clone()
    for row in range(values.shape[0]):
        for sample in sample_ids[row].unique():
            where = sample_ids[row] == sample
            out[row, where] = values[row, where].mean()
    return out


def gspo_layouts_worker(*, layouts: dict, weights: dict, batch: dict, cases: dict) -> dict:
    """Every case in every layout of this world."""
    results = {}
    for lname, layout in layouts.items():
        config = tiny_config(layout, micro_batch=2)
        trainer = build_trainer(config, [batch], weights)
        vocab = config.model.vocab_size
        for cname, case in cases.items():
            results[(lname, cname)] = run_head_case(trainer, make_policy_head(case, vocab))
    return results
