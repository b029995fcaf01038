"""`megatron-keye generate`: load a checkpoint at a TP×PP layout and print what it generates.

    megatron-keye generate --checkpoint runs/sft --prompt "Describe the picture." --image cat.png
    megatron-keye generate --checkpoint runs/sft --prompt "2+2=" --nproc 4 \
        --parallel.tensor=2 --parallel.pipeline=2 --temperature 0.7 --top-p 0.9 --seed 3

The checkpoint's saved config gives the model; the layout is chosen here (any TP×PP whose
product divides the world size; the rest is data parallel, each DP rank taking a contiguous
share of the rows). Weights load from the layout-free checkpoint; generation runs without
context/sequence parallelism and with our core attention (a TE-spec run loads into it, the
parameter names are the same). Under torchrun/srun (RANK set) this process is one rank and
rank 0 prints; otherwise `--nproc` ranks (default 1) are spawned here and the parent prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from megatron_keye.post_training.generation import GenerationOptions, GenerationResult, Prompt
from megatron_keye.post_training.prompts import media_configs


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megatron-keye generate",
        description="Generate from a checkpoint (greedy or sampled, KV cache, any TP/PP layout).")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint or a save dir (latest)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat for a batch)")
    parser.add_argument("--image", action="append", default=[],
                        help="image file shown before every prompt's text (repeatable)")
    parser.add_argument("--video", action="append", default=[],
                        help="video file shown before every prompt's text (repeatable)")
    parser.add_argument("--raw", action="store_true",
                        help="feed the prompt text as is (no chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--stop-token", action="append", default=None,
                        help="token text that ends a sample (default: the tokenizer's eos and "
                             "pad tokens)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the shipped tiny tokenizer)")
    parser.add_argument("--nproc", type=int, default=None, help="local ranks to spawn")
    parser.add_argument("--parallel.tensor", dest="tensor", type=int, default=1)
    parser.add_argument("--parallel.pipeline", dest="pipeline", type=int, default=1)
    parser.add_argument("--parallel.virtual_pipeline", dest="virtual_pipeline", type=int,
                        default=1)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line per sample (tokens, log-probs, text)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Entry point of the `generate` subcommand."""
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.post_training.prompts import build_prompt, media_configs
    from megatron_keye.runtime.spawn import spawn_ranks

    args = parse_args(argv)
    saved = saved_config(args.checkpoint)
    tokenizer = KeyeTokenizer.from_dir(args.tokenizer) if args.tokenizer else KeyeTokenizer.default()
    vocab = (saved.get("model") or {}).get("vocab_size")
    if vocab is not None and tokenizer.vocab_size > int(vocab):
        raise ValueError(f"--tokenizer: {tokenizer.vocab_size} tokens do not fit the checkpoint's "
                         f"model.vocab_size={vocab}")
    image_config, video_config = media_configs(saved)
    prompts = [build_prompt(text, tokenizer=tokenizer, images=args.image, videos=args.video,
                            chat=not args.raw, image_config=image_config,
                            video_config=video_config) for text in args.prompt]
    stops = args.stop_token or [tokenizer.eos_token, tokenizer.pad_token]
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, samples_per_prompt=args.samples,
        stop_token_ids=tuple(tokenizer.special_token_id(t) if tokenizer.has_token(t)
                             else _single_token(tokenizer, t) for t in stops))
    kwargs = dict(checkpoint=args.checkpoint, prompts=prompts, options=options,
                  tensor=args.tensor, pipeline=args.pipeline,
                  virtual_pipeline=args.virtual_pipeline, pad_id=tokenizer.pad_id)
    if "RANK" in os.environ:
        result = generate_rank(**kwargs)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        world = args.nproc or 1
        if world % (args.tensor * args.pipeline):
            raise ValueError(f"--nproc: {world} ranks do not fit parallel.tensor={args.tensor} x "
                             f"parallel.pipeline={args.pipeline}")
        result = spawn_ranks(generate_rank, world,
                             threads=max(1, (os.cpu_count() or 1) // world), **kwargs)[0]
    print_result(result, args.prompt, tokenizer, as_json=args.json)
    return 0


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"--stop-token: {text!r} is {len(ids)} tokens, not one")
    return ids[0]


def saved_config(checkpoint: str) -> dict:
    """The resolved config a checkpoint was saved with."""
    from megatron.core import dist_checkpointing

    from megatron_keye.runtime.checkpoint import resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(checkpoint)
    if directory is None:
        raise FileNotFoundError(f"--checkpoint: no checkpoint at {checkpoint} (nor a `latest` "
                                f"naming one)")
    return dist_checkpointing.load_common_state_dict(str(directory))["config"]


def generation_config(saved: dict, *, tensor: int, pipeline: int, virtual_pipeline: int = 1):
    """The run config to build the generation model from: the checkpoint's model, our layout."""
    from megatron_keye.config import config_from_dict

    saved = dict(saved)
    saved["parallel"] = {"tensor": tensor, "pipeline": pipeline,
                         "virtual_pipeline": virtual_pipeline}
    model = dict(saved.get("model") or {})
    model["recompute"] = "none"
    if model.get("attention_backend") == "te":
        model["attention_backend"] = "auto"
    saved["model"] = model
    return config_from_dict(saved)


def generate_rank(*, checkpoint: str, prompts: list[Prompt], options: GenerationOptions,
                  tensor: int, pipeline: int, pad_id: int,
                  virtual_pipeline: int = 1) -> GenerationResult:
    """One rank: build and load the model, generate this DP rank's rows, gather all rows."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_keye.config import config_to_dict, validate
    from megatron_keye.models.keye_vl.builder import build_model_chunks
    from megatron_keye.post_training.generation import generate
    from megatron_keye.runtime.checkpoint import Checkpointer, resolve_checkpoint_dir
    from megatron_keye.runtime.parallel import ParallelDims, init_distributed

    init_distributed()
    world = dist.get_world_size()
    config = generation_config(saved_config(checkpoint), tensor=tensor, pipeline=pipeline,
                               virtual_pipeline=virtual_pipeline)
    validate(config, world)
    dims = ParallelDims.from_config(config.parallel, world)
    device = dims.initialize(seed=config.seed)
    chunks = build_model_chunks(config, device)
    layout = {"tensor": tensor, "pipeline": pipeline, "virtual_pipeline": virtual_pipeline,
              "context": 1, "data": dims.data}
    Checkpointer(config.checkpoint, run_config=config_to_dict(config), layout=layout).load(
        resolve_checkpoint_dir(checkpoint), chunks=chunks, optimizer=None, weights_only=True)
    dp_rank = parallel_state.get_data_parallel_rank()
    share = -(-len(prompts) // dims.data)
    first = min(dp_rank * share, len(prompts))
    mine = prompts[first : first + share]
    local = None
    if mine:
        local = generate(chunks, mine, options, pad_id=pad_id,
                         first_row=first * options.samples_per_prompt)
        local.prompt_index += first
    gathered = [None] * world
    dist.all_gather_object(gathered, (dp_rank, local))
    parts = dict(gathered)  # every rank of a DP rank holds the same rows
    return merge_results([parts[r] for r in sorted(parts) if parts[r] is not None])


def merge_results(parts: list[GenerationResult]) -> GenerationResult:
    """Rows of several results (same options, so the same width) one after the other."""
    import torch

    return replace(
        parts[0],
        tokens=torch.cat([p.tokens for p in parts]),
        logprobs=torch.cat([p.logprobs for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        stopped=torch.cat([p.stopped for p in parts]),
        prompt_index=torch.cat([p.prompt_index for p in parts]),
    )


def print_result(result: GenerationResult, texts: list[str], tokenizer, *,
                 as_json: bool, stream=None) -> None:
    """One block (or JSON line) per sample: prompt index, sample index, generated text."""
    stream = stream or sys.stdout
    counts: dict[int, int] = {}
    for row in range(result.tokens.size(0)):
        prompt = int(result.prompt_index[row])
        sample = counts.get(prompt, 0)
        counts[prompt] = sample + 1
        ids = result.row_tokens(row)
        text = tokenizer.decode(ids)
        if as_json:
            record = {"prompt": prompt, "sample": sample, "tokens": ids,
                      "logprobs": result.logprobs[row, : len(ids)].tolist(), "text": text,
                      "stopped": bool(result.stopped[row])}
            print(json.dumps(record), file=stream)
        else:
            print(f"=== prompt {prompt} sample {sample}: {texts[prompt]!r}", file=stream)
            print(text, file=stream)


__all__ = ["generate_rank", "main", "media_configs", "parse_args", "print_result"]
