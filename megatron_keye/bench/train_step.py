"""Benchmark one training step of the `small` flavor against transformers' Qwen3ForCausalLM.

Both sides run in this process with the same config, thread count, fp32 weights, random tokens
and AdamW; we report medians of several timed steps after warm-up, tokens/s, MFU against the
matmul peak measured here, and the ratio. A second part measures ZeRO-1's optimizer-state bytes
per rank at DP=1 and DP=2 with spawned gloo processes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _interleaved_times(steps: dict, *, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Time each step function `repeats` times, round-robin, so machine noise hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def ours_step_fn(config, tokens, labels):
    """A set-up Trainer (one process) and a closure running one optimizer step."""
    from megatron_keye.models.keye_vl.rope import text_position_ids
    from megatron_keye.runtime.trainer import Trainer

    class OneBatch:
        def next_step(self):
            b, s = tokens.shape
            return [{"tokens": tokens, "labels": labels,
                     "loss_weights": torch.ones(b, s), "position_ids": text_position_ids(b, s)}]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    trainer = Trainer(config, loader=OneBatch()).setup()
    return trainer, lambda: trainer.train_step(trainer.loader.next_step())


def hf_step_fn(config, tokens, labels, attn_implementation: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_keye.models.keye_vl.hf_adapter import hf_config_dict

    fields = {k: v for k, v in hf_config_dict(config.model).items() if k != "architectures"}
    model = Qwen3ForCausalLM(Qwen3Config(**fields, attn_implementation=attn_implementation))
    model.train()
    opt = config.optimizer
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
    )

    def step():
        adamw.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(),
                                                 labels.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad)
        adamw.step()

    return step


def optimizer_bytes_worker(*, flavor: str, dp: int):
    from megatron_keye.config import load_config
    from megatron_keye.runtime.optim import optimizer_state_bytes

    config = load_config(None, [f"model.flavor={flavor}", "data.seq_length=64",
                                f"schedule.global_batch_size={dp}", "schedule.micro_batch_size=1",
                                "logging.wandb_mode=disabled", "schedule.warmup_iters=0"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (1, 64), generator=g)
    trainer, step = ours_step_fn(config, tokens, tokens.roll(-1, 1))
    step()  # Adam state is allocated on the first update
    return optimizer_state_bytes(trainer.optimizer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-zero1", action="store_true")
    args = parser.parse_args(argv)

    from megatron_keye.config import load_config
    from megatron_keye.logging_setup import configure_logging
    from megatron_keye.runtime.metrics import flops_per_token, measured_matmul_peak

    configure_logging()
    import logging

    logging.getLogger("megatron_keye").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    config = load_config(None, [
        f"model.flavor={args.flavor}", f"data.seq_length={args.seq}",
        "schedule.global_batch_size=1", "schedule.micro_batch_size=1",
        "schedule.warmup_iters=0", "logging.wandb_mode=disabled",
        "logging.output_dir=outputs/bench_train",
    ])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (1, args.seq), generator=g)
    labels = torch.randint(0, config.model.vocab_size, (1, args.seq), generator=g)
    peak_before = measured_matmul_peak(size=2048, repeats=10)
    flops = flops_per_token(config.model, args.seq) * args.seq

    _, ours = ours_step_fn(config, tokens, labels)
    steps = {"megatron-keye (mcore, TP1)": ours}
    for impl in ("sdpa", "eager"):
        steps[f"transformers Qwen3 ({impl} attn)"] = hf_step_fn(config, tokens, labels, impl)
    times = _interleaved_times(steps, warmup=args.warmup, repeats=args.repeats)
    rows = [(name, statistics.median(t), t) for name, t in times.items()]
    t_ours = rows[0][1]
    # The best of two peak readings (before/after), so a noisy moment cannot deflate the peak.
    from megatron_keye.runtime.metrics import _PEAK_CACHE

    _PEAK_CACHE.clear()
    peak = max(peak_before, measured_matmul_peak(size=2048, repeats=10))

    print(f"\none training step, flavor={args.flavor}, seq={args.seq}, batch=1, fp32, "
          f"threads={threads}, matmul peak {peak / 1e9:.1f} GFLOP/s (measured)")
    print(f"{'implementation':34} {'median s':>9} {'tokens/s':>9} {'MFU':>6}  all runs (s)")
    for name, t, all_t in rows:
        print(f"{name:34} {t:9.3f} {args.seq / t:9.0f} {flops / t / peak:6.1%}  "
              + " ".join(f"{x:.3f}" for x in all_t))
    for name, t, _ in rows[1:]:
        print(f"ratio ours / {name}: {t / t_ours:.2f}x (tokens/s, higher is better for us)")

    if not args.skip_zero1:
        from megatron_keye.runtime.spawn import spawn_ranks

        (dp1,) = spawn_ranks(optimizer_bytes_worker, 1, flavor=args.flavor, dp=1)
        dp2 = spawn_ranks(optimizer_bytes_worker, 2, flavor=args.flavor, dp=2)
        print(f"\nZeRO-1 optimizer state (Adam moments), flavor={args.flavor}")
        print(f"  DP=1: {dp1 / 2**20:8.2f} MiB on the one rank")
        print(f"  DP=2: {', '.join(f'{b / 2**20:.2f}' for b in dp2)} MiB per rank "
              f"({max(dp2) / dp1:.3f} of DP=1)")


if __name__ == "__main__":
    main()
