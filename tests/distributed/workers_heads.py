"""Post-training heads: independent plain-torch reference formulas and the spawned-rank workers.

The reference functions below are written from the formulas (TRL/InternVL conventions), with
explicit Python loops over rows and samples, and share no code with `megatron_keye/heads/`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.workers import build_trainer, local_grads, rank_info, tiny_config

# ------------------------------------------------------------------ reference formulas


def reference_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab: int,
                             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, s] log p(label) (0 where label is -100) and entropy, from full [s, b, V'] logits."""
    logp_all = torch.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)
    logp_all = logp_all.transpose(0, 1)  # [b, s, V]
    safe = labels.clamp(min=0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (labels >= 0)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _samples(row_ids: torch.Tensor) -> list[int]:
    seen = []
    for v in row_ids.tolist():
        if v not in seen:
            seen.append(v)
    return seen


def reference_sft_loss(logits, batch, vocab: int, loss_avg: str) -> torch.Tensor:
    logp, _ = reference_token_logprobs(logits, batch["labels"], vocab)
    trained = (batch["loss_weights"] != 0) & (batch["labels"] != -100)
    numerator = logits.new_zeros(())
    denominator = 0.0
    for row in range(logp.shape[0]):
        ids = batch["sample_ids"][row] if "sample_ids" in batch else torch.zeros_like(logp[row])
        for sample in _samples(ids):
            tokens = (ids == sample) & trained[row]
            n = int(tokens.sum())
            if n == 0:
                continue
            f = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[loss_avg]
            w = batch["loss_weights"][row][tokens].double() * f
            numerator = numerator - (logp[row][tokens] * w.float()).sum()
            denominator += float(w.sum())
    return numerator / denominator


def reference_pairs(batch) -> list[tuple[int, int, int]]:
    """(row, chosen sample id, rejected sample id) of every pair, read token by token."""
    pairs = []
    for row in range(batch["labels"].shape[0]):
        ids, role = batch["sample_ids"][row], batch["pair_role"][row]
        order = _samples(ids)
        for i, sample in enumerate(order):
            if int(role[ids == sample][0]) == 1:
                pairs.append((row, sample, order[i + 1]))
    return pairs


def reference_preference_loss(logits, batch, vocab: int, *, terms: dict, beta: float,
                              label_smoothing: float = 0.0, delta: float = 0.0) -> dict:
    """TRL-style DPO/IPO/BCO-pair/SFT mix; returns the loss and the reward metrics."""
    logp, _ = reference_token_logprobs(logits, batch["labels"], vocab)
    ref = batch["ref_logprobs"].float()
    trained = (batch["loss_weights"] != 0) & (batch["labels"] != -100)
    policy_c, policy_r, ref_c, ref_r, len_c, len_r = ([] for _ in range(6))
    for row, c, r in reference_pairs(batch):
        ids = batch["sample_ids"][row]
        mc, mr = (ids == c) & trained[row], (ids == r) & trained[row]
        policy_c.append(logp[row][mc].sum())
        policy_r.append(logp[row][mr].sum())
        ref_c.append(ref[row][mc].sum())
        ref_r.append(ref[row][mr].sum())
        len_c.append(float(mc.sum()))
        len_r.append(float(mr.sum()))
    policy_c, policy_r = torch.stack(policy_c), torch.stack(policy_r)
    ref_c, ref_r = torch.stack(ref_c), torch.stack(ref_r)
    len_c, len_r = torch.tensor(len_c), torch.tensor(len_r)
    loss = logits.new_zeros(())
    if "sigmoid" in terms:
        z = beta * ((policy_c - policy_r) - (ref_c - ref_r))
        per = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
        loss = loss + terms["sigmoid"] * per.mean()
    if "ipo" in terms:
        h = (policy_c / len_c - policy_r / len_r) - (ref_c / len_c - ref_r / len_r)
        loss = loss + terms["ipo"] * ((h - 1 / (2 * beta)) ** 2).mean()
    chosen_rewards = beta * (policy_c - ref_c)
    rejected_rewards = beta * (policy_r - ref_r)
    if "bco_pair" in terms:
        per = (-F.logsigmoid(chosen_rewards - delta)
               - F.logsigmoid(-(rejected_rewards - delta)))
        loss = loss + terms["bco_pair"] * per.mean()
    if "sft" in terms:
        chosen_tokens = trained & (batch["pair_role"] == 1)
        loss = loss + terms["sft"] * (-(logp[chosen_tokens]).sum() / chosen_tokens.sum())
    rewards = torch.cat([chosen_rewards, rejected_rewards]).detach()
    return {"loss": loss, "chosen": chosen_rewards.detach().mean().item(),
            "rejected": rejected_rewards.detach().mean().item(),
            "margins": (chosen_rewards - rejected_rewards).detach().mean().item(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_mean": rewards.mean().item(), "reward_count": rewards.numel()}


PRESETS = {"dpo": {"sigmoid": 1.0}, "mpo": {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}}


def case_terms(case: dict) -> dict:
    pref = case.get("preference", {})
    if pref.get("loss_types"):
        weights = pref.get("loss_weights") or [1.0] * len(pref["loss_types"])
        return dict(zip(pref["loss_types"], weights, strict=True))
    return PRESETS[case["head"]]


def reference_case_loss(logits, batch, vocab: int, case: dict) -> torch.Tensor:
    if case["head"] in ("sft", "lm"):
        return reference_sft_loss(logits, batch, vocab, case.get("sft", {}).get("loss_avg", "token"))
    pref = case.get("preference", {})
    return reference_preference_loss(
        logits, batch, vocab, terms=case_terms(case), beta=pref.get("beta", 0.1),
        label_smoothing=pref.get("label_smoothing", 0.0), delta=case.get("delta", 0.0),
    )["loss"]


# --------------------------------------------------------------------------- our heads


def make_head(case: dict, vocab: int):
    from megatron_keye.config.schema import HeadConfig, PreferenceHeadConfig, SFTHeadConfig
    from megatron_keye.heads import build_loss_head

    config = HeadConfig(sft=SFTHeadConfig(**case.get("sft", {})),
                        preference=PreferenceHeadConfig(**case.get("preference", {})))
    head = build_loss_head(case["head"], head_config=config, vocab_size=vocab)
    if "delta" in case:
        head.running.load_state_dict({"mean": case["delta"], "var": 0.5, "count": 7.0})
    return head


def run_head_case(trainer, head) -> dict:
    """Loss, count, reports and finalized gradients of one global batch with `head`."""
    trainer.loss_head = trainer.step_runner.loss_head = head
    trainer.step_runner._report_names = None
    trainer.loader.step = 0
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    reports = trainer.forward_backward(trainer.loader.next_step(), force_all_reduce=True)
    totals = trainer.step_runner.global_reports(reports)
    total, count = totals.pop("__loss__")
    return {**rank_info(), "loss": total / count, "count": count,
            "reports": {k: s / c if c else float("nan") for k, (s, c) in totals.items()},
            "grads": local_grads(trainer)}


# ------------------------------------------------------------------------------ workers


def reference_worker(*, weights: dict, batch: dict, cases: dict, pipeline_dir: str) -> dict:
    """Single process: the model's full logits and, per case, the formula loss and gradients;
    then a tiny SFT -> MPO pipeline (`pipeline_phase`)."""
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
    out = {"logprobs": reference_token_logprobs(logits.detach(), batch["labels"], vocab)[0]}
    for name, case in cases.items():
        loss = reference_case_loss(logits, batch, vocab, case)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        out[name] = {"loss": loss.item(), "grads": dict(zip(names, grads, strict=True))}
        if case["head"] not in ("sft", "lm"):
            pref = case.get("preference", {})
            out[name]["metrics"] = reference_preference_loss(
                logits.detach(), batch, vocab, terms=case_terms(case),
                beta=pref.get("beta", 0.1), delta=case.get("delta", 0.0))
            out[name]["metrics"].pop("loss")
    out["pipeline"] = pipeline_phase(batch=batch, weights=weights, workdir=pipeline_dir)
    return out


def pipeline_phase(*, batch: dict, weights: dict, workdir: str, iters: int = 5) -> dict:
    """SFT from given weights, then MPO from the SFT checkpoint with it as frozen reference."""
    common = (f"schedule.train_iters={iters}", "logging.log_interval=1000",
              f"logging.output_dir={workdir}/logs")
    sft_batch = {k: v for k, v in batch.items() if k not in ("pair_role", "ref_logprobs")}
    config = tiny_config({}, extra=(*common, "stage.loss_head=sft",
                                    "stage.head.sft.loss_avg=square",
                                    f"checkpoint.save_dir={workdir}/sft"))
    sft = [r.loss for r in build_trainer(config, [sft_batch], weights).run()]
    config = tiny_config({}, extra=(
        *common, "stage.loss_head=mpo", "stage.head.preference.reference=model",
        f"stage.head.preference.reference_load={workdir}/sft", f"checkpoint.load={workdir}/sft",
        "checkpoint.load_weights_only=true", f"checkpoint.save_dir={workdir}/mpo",
        "optimizer.lr=0.002"))
    trainer = build_trainer(config, [{k: v for k, v in batch.items() if k != "ref_logprobs"}],
                            None)
    mpo = [(r.loss, r.reports) for r in trainer.run()]
    return {"sft": sft, "mpo": [loss for loss, _ in mpo], "mpo_reports": [r for _, r in mpo],
            "delta": trainer.loss_head.state_dict()["running"]["mean"]}


def layouts_worker(*, layouts: dict, weights: dict, batch: dict, cases: dict,
                   checkpoint_dir: str, resume: dict, frozen_layouts: tuple[str, ...],
                   logprobs_check: dict | None = None) -> dict:
    """Every case in every layout of this world; then the frozen-reference path (`frozen_layouts`);
    then MPO runs straight and killed-and-resumed (`resume`: resume_run's arguments)."""
    from megatron_keye.post_training.reference import reference_logprobs_from_checkpoint

    results = {}
    for lname, layout in layouts.items():
        config = tiny_config(layout, micro_batch=2)
        trainer = build_trainer(config, [batch], weights)
        vocab = config.model.vocab_size
        for cname, case in cases.items():
            results[(lname, cname)] = run_head_case(trainer, make_head(case, vocab))
        if layout.get("tensor", 1) == 2 and logprobs_check is not None:
            results["tp_logprobs"] = tp_logprobs_phase(**logprobs_check)
    # frozen reference = the policy's own weights: DPO gives log 2 and zero margins, and the
    # reference pass's log-probs (CP shares merged back) equal the single process's
    trainer.checkpointer.config.save_dir = f"{checkpoint_dir}/policy"
    trainer.checkpointer.save(chunks=trainer.model, optimizer=None,
                              state=trainer.training_state())  # weights only
    for lname in frozen_layouts:
        config = tiny_config(layouts[lname], micro_batch=2, extra=(
            "stage.loss_head=dpo", "stage.head.preference.reference=model",
            f"stage.head.preference.reference_load={checkpoint_dir}/policy"))
        frozen = build_trainer(config, [{k: v for k, v in batch.items() if k != "ref_logprobs"}],
                               weights)
        outcome = run_head_case(frozen, frozen.loss_head)
        frozen.loader.step = 0
        full = reference_logprobs_from_checkpoint(config, f"{checkpoint_dir}/policy",
                                                  frozen.loader.next_step())
        results[("frozen_reference", lname)] = {
            "loss": outcome["loss"], "reports": outcome["reports"],
            "logprobs": None if full is None else torch.cat(full)}
    results["straight"] = resume_run(**resume, save_dir=f"{checkpoint_dir}/straight",
                                     stop_at=resume["iters"])
    results["resumed"] = resume_run(**resume, save_dir=f"{checkpoint_dir}/resumed", stop_at=2)
    return results


def tp_logprobs_phase(*, logits: torch.Tensor, labels: torch.Tensor, vocab: int,
                      temperature: float, weights: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Log-probs/entropy of this TP rank's vocabulary slice (the last rank's slice partly
    padding) and the gradient of a weighted sum of both with respect to the slice."""
    from megatron.core import parallel_state as ps

    from megatron_keye.heads.logprobs import vocab_parallel_logprobs

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    local = logits.chunk(size, dim=-1)[rank].clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(local, labels, vocab_size=vocab,
                                            temperature=temperature)
    (grad,) = torch.autograd.grad((logp * weights[0] + entropy * weights[1]).sum(), local)
    return {"rank": rank, "size": size, "logp": logp.detach(), "entropy": entropy.detach(),
            "grad": grad}


def resume_run(*, batches: list[dict], weights: dict, save_dir: str, stop_at: int,
               iters: int, layout: dict) -> dict:
    """MPO for `iters` steps, optionally stopped after `stop_at` and resumed from save_dir."""
    extra = ("stage.loss_head=mpo", f"schedule.train_iters={iters}",
             f"checkpoint.save_dir={save_dir}", "checkpoint.save_at_end=false",
             f"logging.output_dir={save_dir}/logs", "logging.log_interval=1000")
    config = tiny_config(layout, micro_batch=2, extra=(*extra, f"schedule.exit_at_iteration={stop_at}"))
    trainer = build_trainer(config, batches, weights)
    history = [r.loss for r in trainer.run()]
    if stop_at < iters:
        config = tiny_config(layout, micro_batch=2, extra=extra)
        trainer = build_trainer(config, batches, None)  # weights come from save_dir
        assert trainer.iteration == stop_at, trainer.iteration
        history += [r.loss for r in trainer.run()]
    return {"losses": history, "head": trainer.loss_head.state_dict(), "rank": dist.get_rank()}
