"""Benchmark the post-training heads' steps against the pretraining (LM) step on the same tokens.

One process (TP=1) and two processes (TP=2) each build one `small`-flavor trainer and time the
forward+backward of one micro-batch (the optimizer update is the same for every head and left
out) with the heads swapped in turn, round-robin so machine noise hits all alike; medians of
several runs:
- `lm`: megatron-core's vocab-parallel cross-entropy on a row of S tokens (packed like the SFT
  row, so the attention work is the same and the difference is the head);
- `sft`: the SFT head (square weights) on the same S tokens packed as samples with prompt masks;
- `mpo`: the MPO head on the same S tokens packed as chosen/rejected pairs, precomputed
  reference log-probs;
- `sft chosen-only`: the SFT head on a row holding only the chosen samples (S/2 tokens).
Ratios printed: MPO / SFT-on-the-chosen (target <= 2.1: the pair costs about its two halves),
SFT / LM at TP=2 (target <= 1.05: our out-of-place fp32 log-prob + entropy over the sharded
vocabulary against megatron-core's in-place cross-entropy), and the log-prob/entropy function
alone (forward+backward on the step's logits) as a share of the LM step at TP=2.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def posttrain_batches(*, seq: int, vocab: int, pairs: int, prompt: int, seed: int = 0) -> dict:
    """The four micro-batches (one row each) of the benchmark, on the same token budget."""
    from megatron_keye.models.keye_vl.rope import packed_text_position_ids

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, seq), generator=g)
    labels = torch.randint(0, vocab, (1, seq), generator=g)
    length = seq // (2 * pairs)
    sample_ids = torch.arange(2 * pairs).repeat_interleave(length).unsqueeze(0)
    role = (sample_ids % 2) + 1  # 1 chosen, 2 rejected, alternating
    weights = torch.ones(1, seq)
    weights[0, (torch.arange(seq) % length) < prompt] = 0.0
    packed = {"tokens": tokens, "labels": labels, "loss_weights": weights,
              "sample_ids": sample_ids, "position_ids": packed_text_position_ids(sample_ids)}
    # the same packed row (same attention work), every token trained
    lm = {**packed, "loss_weights": torch.ones(1, seq)}
    mpo = {**packed, "pair_role": role,
           "ref_logprobs": -3.0 * torch.rand(1, seq, generator=g) - 1.0}
    keep = role[0] == 1
    chosen_ids = sample_ids[:, keep] // 2
    chosen = {"tokens": tokens[:, keep], "labels": labels[:, keep],
              "loss_weights": weights[:, keep], "sample_ids": chosen_ids,
              "position_ids": packed_text_position_ids(chosen_ids)}
    return {"lm": lm, "sft": packed, "mpo": mpo, "sft chosen-only": chosen}


def bench_worker(*, flavor: str, seq: int, tp: int, pairs: int, repeats: int,
                 warmup: int) -> dict:
    """Median forward+backward seconds per head on this world's layout (rank 0 reports)."""
    import logging

    import torch.distributed as dist

    from megatron_keye.config import load_config
    from megatron_keye.heads import build_loss_head
    from megatron_keye.heads.logprobs import vocab_parallel_logprobs
    from megatron_keye.runtime.trainer import Trainer

    logging.getLogger("megatron_keye").setLevel(logging.WARNING)
    config = load_config(None, [
        f"model.flavor={flavor}", f"data.seq_length={seq}", f"parallel.tensor={tp}",
        "schedule.global_batch_size=1", "schedule.micro_batch_size=1",
        "schedule.warmup_iters=0", "logging.wandb_mode=disabled",
        "logging.output_dir=outputs/bench_posttrain",
    ])
    vocab = config.model.vocab_size
    batches = posttrain_batches(seq=seq, vocab=vocab, pairs=pairs, prompt=seq // (8 * pairs))
    heads = {
        "lm": build_loss_head("lm"),
        "sft": build_loss_head("sft", vocab_size=vocab),
        "mpo": build_loss_head("mpo", vocab_size=vocab),
        "sft chosen-only": build_loss_head("sft", vocab_size=vocab),
    }
    heads["sft"].loss_avg = heads["sft chosen-only"].loss_avg = "square"

    class Idle:
        def next_step(self):
            raise RuntimeError("the benchmark feeds batches itself")

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    trainer = Trainer(config, loader=Idle()).setup()
    runner = trainer.step_runner

    def forward_backward(name):
        runner.loss_head = heads[name]
        runner._report_names = None
        for chunk in trainer.model:
            chunk.zero_grad_buffer()
        runner.run([batches[name]])

    # the log-prob/entropy function alone on logits shaped like the step's, forward + backward
    width = config.model.padded_vocab_size // tp
    logits = torch.randn(seq, 1, width, requires_grad=True)
    labels = batches["lm"]["labels"].T.contiguous()

    def logprobs_only():
        logp, entropy = vocab_parallel_logprobs(logits, labels, vocab_size=vocab)
        torch.autograd.grad((logp.sum() + entropy.sum()), logits)

    steps = {name: (lambda n=name: forward_backward(n)) for name in heads}
    steps["log-prob+entropy only"] = logprobs_only
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    tokens = {name: int(b["tokens"].numel()) for name, b in batches.items()}
    tokens["log-prob+entropy only"] = seq
    return {"times": times, "cpu_times": cpu_times, "tokens": tokens,
            "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=4, help="chosen/rejected pairs per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--skip-tp2", action="store_true")
    args = parser.parse_args(argv)

    from megatron_keye.runtime.spawn import spawn_ranks

    kwargs = dict(flavor=args.flavor, seq=args.seq, pairs=args.pairs, repeats=args.repeats,
                  warmup=args.warmup, threads=args.threads, timeout=3600.0)
    results = {1: spawn_ranks(bench_worker, 1, tp=1, **kwargs)[0]}
    if not args.skip_tp2:
        results[2] = spawn_ranks(bench_worker, 2, tp=2, **kwargs)[0]

    print(f"\npost-training heads, flavor={args.flavor}, row of {args.seq} tokens "
          f"({args.pairs} pairs), fp32, forward+backward of one micro-batch (no optimizer), "
          f"medians of {args.repeats}")
    print(f"{'TP':>3} {'step':24} {'tokens':>7} {'median s':>9} {'tokens/s':>9} {'min s':>7}"
          f" {'cpu s':>7}  all runs (s)")
    medians, minima, cpu = {}, {}, {}
    for tp, result in results.items():
        for name, runs in result["times"].items():
            median = statistics.median(runs)
            medians[(tp, name)], minima[(tp, name)] = median, min(runs)
            # rank 0's CPU seconds (one thread): the work done, less sensitive to a busy machine
            cpu[(tp, name)] = statistics.median(result["cpu_times"][name])
            n = result["tokens"][name]
            print(f"{tp:>3} {name:24} {n:>7} {median:9.3f} {n / median:9.0f} {min(runs):7.3f} "
                  f"{cpu[(tp, name)]:7.3f}  " + " ".join(f"{t:.3f}" for t in runs))
    for tp in results:
        for label, t in (("medians", medians), ("minima", minima), ("rank-0 CPU s", cpu)):
            mpo, chosen, lm = t[(tp, "mpo")], t[(tp, "sft chosen-only")], t[(tp, "lm")]
            print(f"TP={tp} ({label}): MPO (chosen+rejected) / SFT (chosen alone) = "
                  f"{mpo / chosen:.2f}x (target <= 2.1); SFT / LM on the same tokens = "
                  f"{t[(tp, 'sft')] / lm:.3f}x; MPO / LM = {mpo / lm:.3f}x")
    if 2 in results:
        for label, t in (("medians", medians), ("rank-0 CPU s", cpu)):
            share = t[(2, "log-prob+entropy only")] / t[(2, "lm")]
            print(f"TP=2 ({label}): log-prob+entropy over the sharded vocabulary alone = "
                  f"{share:.1%} of the LM step (target <= 5%); SFT step vs LM step: "
                  f"{t[(2, 'sft')] / t[(2, 'lm')] - 1:+.1%}")


if __name__ == "__main__":
    main()
