"""Benchmark batched greedy generation (KV cache, TP=1) against transformers' `generate`.

Both sides run in this process on the same random weights (ours drawn by name, copied into a
Qwen3ForCausalLM through the HF name map), the same prompts (equal lengths, so neither pads),
fp32, the same thread count, and generate the same number of tokens with their KV caches (EOS
off); the peer runs with our CPU shim's CUDA-argument rewriting paused, as our generation does.
Timed runs alternate between the implementations; the table shows medians, generated
tokens/s and the ratio. A no-cache recompute loop over our model is the third row, to show what
the cache buys.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _interleaved(runs: dict, *, warmup: int, repeats: int) -> dict[str, list[float]]:
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _hf_model(config, chunk):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_keye.models.keye_vl import hf_adapter
    from megatron_keye.models.keye_vl.builder import named_parameters_global

    fields = {k: v for k, v in hf_adapter.hf_config_dict(config.model).items()
              if k != "architectures"}
    model = Qwen3ForCausalLM(Qwen3Config(**fields, attn_implementation="sdpa")).eval()
    native = {k: v.detach() for k, v in named_parameters_global(chunk).items()}
    model.load_state_dict(hf_adapter.native_to_hf(native, config.model), strict=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def _recompute(chunk, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy without a cache: the whole sequence again for every new token."""
    from megatron_keye.models.keye_vl.rope import text_position_ids

    sequence = tokens
    for _ in range(steps):
        b, s = sequence.shape
        logits = chunk(sequence, text_position_ids(b, s))
        sequence = torch.cat([sequence, logits[-1].argmax(-1, keepdim=True)], dim=1)
    return sequence[:, tokens.size(1):]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-recompute", action="store_true")
    args = parser.parse_args(argv)

    import logging

    from megatron_keye.config import load_config
    from megatron_keye.logging_setup import configure_logging
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.post_training.generation import GenerationOptions, Prompt, generate
    from megatron_keye.runtime.cpu_compat import device_arguments_as_given
    from megatron_keye.runtime.parallel import ParallelDims

    configure_logging()
    logging.getLogger("megatron_keye").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(None, [f"model.flavor={args.flavor}", "model.attention_backend=sdpa",
                                "logging.wandb_mode=disabled"])
    ParallelDims(tensor=1).initialize(seed=config.seed)
    (chunk,) = build_model_chunks(config)
    chunk.eval()
    hf = _hf_model(config, chunk)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1280, (args.batch, args.prompt_length), generator=g)
    prompts = [Prompt(tokens=row) for row in tokens]
    options = GenerationOptions(max_new_tokens=args.new_tokens)
    results = {}

    def ours():
        results["ours"] = generate([chunk], prompts, options, pad_id=0).tokens

    def theirs():
        with torch.no_grad(), device_arguments_as_given():  # the peer needs no CPU shim
            out = hf.generate(tokens, attention_mask=torch.ones_like(tokens),
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, use_cache=True)
        results["hf"] = out[:, tokens.size(1):]

    runs = {"megatron-keye generate (KV cache)": ours,
            "transformers generate (KV cache, sdpa)": theirs}
    if not args.skip_recompute:
        runs["megatron-keye, no cache (recompute)"] = lambda: _recompute(chunk, tokens,
                                                                         args.new_tokens)
    times = _interleaved(runs, warmup=args.warmup, repeats=args.repeats)
    generated = args.batch * args.new_tokens
    agree = bool(torch.equal(results["ours"], results["hf"]))
    print(f"\ngreedy generation, flavor={args.flavor}, batch={args.batch}, "
          f"prompt={args.prompt_length}, new tokens={args.new_tokens}, fp32, "
          f"threads={torch.get_num_threads()}, {args.repeats} runs (medians)")
    print(f"{'implementation':40} {'median s':>9} {'tokens/s':>9}  all runs (s)")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        print(f"{name:40} {medians[name]:9.3f} {generated / medians[name]:9.1f}  "
              f"{', '.join(f'{v:.3f}' for v in values)}")
    ours_name = next(iter(times))
    for name in list(times)[1:]:
        print(f"ratio ours / {name}: {medians[name] / medians[ours_name]:.2f}x "
              f"(tokens/s, higher is better for us)")
    print(f"same greedy tokens as transformers: {agree}")
