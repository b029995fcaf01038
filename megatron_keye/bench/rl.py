"""Benchmark one RL (GSPO) iteration on the small flavor, by phase, against its peers.

One process (TP=1), fp32, the RL loop's own pieces on a synthetic arithmetic prompt set:
- rollout: `RolloutSource` generating G samples per prompt with the KV cache (hints off, so
  every iteration generates once), and the same prompts × G through transformers'
  `Qwen3ForCausalLM.generate` (KV cache, sdpa, sampling at T=1, the same weights copied in)
  for the same number of new tokens (stop tokens off on both sides) — generated tokens/s; the
  peer runs with our CPU shim's CUDA-argument rewriting paused, as our generation does (it
  costs a Python call per torch op and transformers needs none of it);
- reward: the verifiers over the decoded responses;
- log-prob: a forward-only pass of the gspo head over the rollout batch (what recomputing π_old
  with the training engine would cost; the loop keeps the sampler's log-probs instead);
- update: the `rl.minibatches` optimizer steps, against the same micro-batches trained as one
  SFT step each (the `sft` head, same tokens, same optimizer).
Timed repeats alternate and the table shows medians. The machine is shared: read ratios, not
absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def bench_worker(*, flavor: str, prompts_per_rollout: int, group_size: int, new_tokens: int,
                 minibatches: int, repeats: int, root: str) -> dict:
    from megatron_keye.bench.generation import _hf_model
    from megatron_keye.config import load_config
    from megatron_keye.data.rl_prompts import RLPromptConfig, write_rl_prompts
    from megatron_keye.heads import build_loss_head
    from megatron_keye.post_training.generation import GenerationOptions, generate
    from megatron_keye.post_training.rl_batch import local_microbatches, split_minibatches
    from megatron_keye.runtime.cpu_compat import device_arguments_as_given
    from megatron_keye.runtime.step import ModelStep
    from megatron_keye.runtime.trainer import Trainer

    path = write_rl_prompts(root, RLPromptConfig(colour=0, arithmetic=64))
    config = load_config(None, [
        f"model.flavor={flavor}", "model.attention_backend=sdpa", "logging.wandb_mode=disabled",
        "stage.loss_head=gspo", f"rl.prompts={path}", f"rl.prompts_per_rollout={prompts_per_rollout}",
        f"rl.group_size={group_size}", f"rl.minibatches={minibatches}",
        f"rl.max_new_tokens={new_tokens}", "rl.hints=false", "rl.reward_terms=[numeric]",
        "data.seq_length=256", "schedule.micro_batch_size=2", "schedule.global_batch_size=8",
        f"schedule.train_iters={minibatches * (repeats + 1) * 2}", "schedule.warmup_iters=0",
        "parallel.distributed_optimizer=false", "optimizer.lr=1e-6",
        "optimizer.min_lr=1e-6", "schedule.decay_style=constant"])
    trainer = Trainer(config).setup()
    source = trainer.loader
    chunk = trainer.model[0].module
    hf = _hf_model(config, chunk)
    sft_head = build_loss_head("sft", head_config=config.stage.head,
                               vocab_size=config.model.vocab_size)
    sft_runner = ModelStep(model=trainer.model, loss_head=sft_head, device=trainer.device,
                           seq_length=config.data.seq_length, micro_batch_size=2,
                           vocab_size=config.model.vocab_size)
    gspo_runner, gspo_head = trainer.step_runner, trainer.loss_head
    pad = source.tokenizer.pad_id
    times: dict[str, list[float]] = {k: [] for k in (
        "rollout (ours, loop)", "rollout: ours, no stops", "rollout: transformers generate",
        "reward", "log-prob (forward only)", "update (gspo minibatch steps)",
        "sft steps (same tokens)")}
    tokens_generated = {"ours": 0, "hf": 0}
    for repeat in range(repeats + 1):
        rollouts = source.rollout_batch()
        measured = repeat > 0  # the first iteration warms up
        batches = split_minibatches(rollouts, minibatches=minibatches,
                                    seq_length=config.data.seq_length, pad_id=pad,
                                    row_multiple=2)
        local = [local_microbatches(b, dp_rank=0, dp_size=1, micro_batch=2,
                                    image_token_id=config.model.image_token_id,
                                    video_token_id=config.model.video_token_id) for b in batches]
        prompts = [source.prompt(i, 0) for i in sorted({r.prompt_index for r in rollouts})]
        options = GenerationOptions(max_new_tokens=new_tokens, temperature=1.0, seed=repeat,
                                    samples_per_prompt=group_size)
        start = time.perf_counter()
        result = generate(trainer.model, prompts, options, pad_id=pad)
        ours_s = time.perf_counter() - start
        width = max(p.tokens.numel() for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - p.tokens.numel():] = p.tokens
            mask[row, width - p.tokens.numel():] = 1
        start = time.perf_counter()
        with torch.no_grad(), device_arguments_as_given():  # the peer needs no CPU shim
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, num_return_sequences=group_size,
                              use_cache=True, pad_token_id=pad)
        hf_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            for mbs in local:
                gspo_runner.run(mbs, forward_only=True)
        logprob_s = time.perf_counter() - start
        start = time.perf_counter()
        for mbs in local:
            trainer.train_step(mbs)
        update_s = time.perf_counter() - start
        trainer.step_runner, trainer.loss_head = sft_runner, sft_head
        start = time.perf_counter()
        for mbs in local:
            trainer.train_step(mbs)
        sft_s = time.perf_counter() - start
        trainer.step_runner, trainer.loss_head = gspo_runner, gspo_head
        if not measured:
            continue
        tokens_generated["ours"] = int(result.lengths.sum())
        tokens_generated["hf"] = out[:, width:].numel()  # min_new_tokens: every row full
        for name, value in (("rollout (ours, loop)", source.timings["rollout_s"]),
                            ("rollout: ours, no stops", ours_s),
                            ("rollout: transformers generate", hf_s),
                            ("reward", source.timings["reward_s"]),
                            ("log-prob (forward only)", logprob_s),
                            ("update (gspo minibatch steps)", update_s),
                            ("sft steps (same tokens)", sft_s)):
            times[name].append(value)
    return {"times": times, "tokens": tokens_generated,
            "loop_tokens": source.timings["generated_tokens"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from megatron_keye.runtime.spawn import spawn_ranks

    with tempfile.TemporaryDirectory() as root:
        (result,) = spawn_ranks(bench_worker, 1, threads=args.threads, timeout=3600,
                                flavor=args.flavor, prompts_per_rollout=args.prompts,
                                group_size=args.group_size, new_tokens=args.new_tokens,
                                minibatches=args.minibatches, repeats=args.repeats, root=root)
    times = result["times"]
    medians = {k: statistics.median(v) for k, v in times.items()}
    iteration = sum(medians[k] for k in ("rollout (ours, loop)", "reward",
                                         "update (gspo minibatch steps)"))
    print(f"\nRL iteration, flavor={args.flavor}, {args.prompts} prompts x G={args.group_size}, "
          f"{args.new_tokens} new tokens, {args.minibatches} minibatches, TP=1, fp32, "
          f"{args.repeats} runs (medians; shared machine, noisy)")
    print(f"{'phase':36} {'median s':>9}  all runs (s)")
    for name, values in times.items():
        print(f"{name:36} {medians[name]:9.3f}  {', '.join(f'{v:.3f}' for v in values)}")
    print(f"{'iteration (rollout + reward + update)':36} {iteration:9.3f}")
    ours = result["tokens"]["ours"] / medians["rollout: ours, no stops"]
    theirs = result["tokens"]["hf"] / medians["rollout: transformers generate"]
    print(f"generated tokens/s: ours {ours:.1f}, transformers {theirs:.1f}; ratio "
          f"{ours / theirs:.2f}x (goal >= 1.0)")
    print(f"update / SFT steps on the same tokens: "
          f"{medians['update (gspo minibatch steps)'] / medians['sft steps (same tokens)']:.2f}x "
          f"(goal <= 1.2)")
