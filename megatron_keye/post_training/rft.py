"""`megatron-keye rft`: rejection-sampling fine-tuning data from a checkpoint (a data stage).

    megatron-keye rft --checkpoint runs/sft --prompts prompts.jsonl --out rft/ --samples 8 \
        --mode all --reward exact=1.0 --temperature 0.7 --nproc 4 --parallel.tensor=2

For every prompt of the `rl.prompts`-format JSONL (`prompt`, `answer`, optional `mode`,
`image(s)`/`video(s)`, `source`), k responses are sampled from the checkpoint
(`generate_cli.generate_rank`: any TP×PP layout, the rest data parallel, seeded), scored by the
verifier terms (`rewards.combine`), and a response is accepted when its reward reaches
`--success` (default 1.0). Accepted responses are deduplicated per prompt (whitespace-normalized
text) and kept all (`--mode all`: every distinct correct path, RFT's "distinct reasoning paths")
or only the best (`--mode best`: the highest reward, the first among ties). They are written as
conversations (`messages` + `images`/`videos`, one `OUT/accepted-SOURCE.jsonl` per source) and
turned into SFT shards by the shard writer (`OUT/shards/rft.index.json`), ready for an `sft`
stage. Acceptance per source is printed and returned.

A reward model (`--reward-model CKPT`, a value-head checkpoint sharing the policy's tokenizer)
is served in the same ranks right after sampling (`reward_model.RewardModelScorer`, the sampler's
TP×PP layout): it scores every sample and every prompt's reference answer (prompt as rendered +
response, as its training samples were). Its score is then the `model` reward term
(`--reward model=W`), and with `--replace-reference` it rewrites the prompt set the way the
spec's RL iteration step 2 rewrites the cold-start set: each prompt is written once, with its
reference answer, unless the accepted distinct sample the reward model scores highest scores
strictly higher than the reference, in which case that sample replaces it (`--mode` does not
apply; `OUT/accepted-SOURCE.jsonl` then holds every prompt's written sample). Those records carry
`replaced_reference`, `reference_score` and `sample_score` (the best accepted sample's, null
when none was accepted); replacements are counted per source next to acceptance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_keye.post_training.rewards import RewardSpec, combine

MODES = ("all", "best")


@dataclass(kw_only=True)
class RFTOptions:
    """What to sample, how to accept and where to write."""

    checkpoint: str
    prompts: str
    out: str
    samples: int = 8  # k responses per prompt
    mode: str = "all"  # all: every distinct accepted response; best: the best one per prompt
    reward_terms: list[str] = field(default_factory=lambda: ["exact"])
    reward_weights: list[float] = field(default_factory=lambda: [1.0])
    success: float = 1.0  # a response is accepted when its reward reaches this
    max_new_tokens: int = 128
    temperature: float = 0.7  # RFT paper: 0.7
    top_p: float = 1.0
    seed: int = 0
    tensor: int = 1
    pipeline: int = 1
    nproc: int | None = None
    tokenizer: str | None = None
    chat: bool = True
    reward_model: str | None = None  # value-head checkpoint: the `model` term, replacements
    replace_reference: bool = False  # write the reference or the RM-preferred accepted sample
    reward_batch_size: int = 8  # rows per reward-model forward

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--mode: {self.mode!r} is not one of {MODES}")
        if self.samples < 1:
            raise ValueError(f"--samples: must be >= 1, got {self.samples}")
        if len(self.reward_terms) != len(self.reward_weights):
            raise ValueError("--reward: one weight per term")
        if "model" in self.reward_terms and not self.reward_model:
            raise ValueError("--reward-model: the 'model' reward term needs a reward model "
                             "checkpoint (model.output_head: value)")
        if self.replace_reference and not self.reward_model:
            raise ValueError("--replace-reference: needs --reward-model (it compares the "
                             "reward model's scores of the reference and the samples)")
        if self.reward_batch_size < 1:
            raise ValueError(f"--reward-batch-size: must be >= 1, got {self.reward_batch_size}")


@dataclass(kw_only=True)
class RFTReport:
    """Per source: prompts, samples drawn, samples accepted, samples kept (written), and with
    --replace-reference the references replaced; where it wrote."""

    per_source: dict[str, dict[str, int]]
    accepted_path: str  # the first source's accepted JSONL (all of them: `accepted_paths`)
    accepted_paths: dict[str, str]
    index_path: str
    # every sample: prompt index, tokens, text, reward, accepted, kept (and `score`, the reward
    # model's, when one is served)
    candidates: list[dict]
    reference_scores: list[float] | None = None  # the reward model's score of each reference

    def as_dict(self) -> dict:
        return {"per_source": self.per_source, "accepted_paths": self.accepted_paths,
                "index_path": self.index_path}

    def table(self) -> str:
        replacing = any("replaced" in s for s in self.per_source.values())
        lines = [f"{'source':<16} {'prompts':>8} {'samples':>8} {'accepted':>9} {'rate':>7} "
                 f"{'kept':>6}" + (f" {'replaced':>9}" if replacing else "")]
        for source, s in sorted(self.per_source.items()):
            rate = s["accepted"] / s["samples"] if s["samples"] else 0.0
            lines.append(f"{source:<16} {s['prompts']:>8} {s['samples']:>8} {s['accepted']:>9} "
                         f"{rate:>7.1%} {s['kept']:>6}"
                         + (f" {s.get('replaced', 0):>9}" if replacing else ""))
        return "\n".join(lines)


def normalized(text: str) -> str:
    """The dedup key of a response: whitespace collapsed, stripped."""
    return re.sub(r"\s+", " ", text).strip()


def select(candidates: list[dict], *, mode: str, success: float) -> list[dict]:
    """The kept samples of one prompt's candidates (dicts with `text` and `reward`), in order:
    accepted (reward >= success), deduplicated by normalized text; `best` keeps the first of
    the highest reward."""
    seen, kept = set(), []
    for candidate in candidates:
        key = normalized(candidate["text"])
        if candidate["reward"] >= success and key and key not in seen:
            seen.add(key)
            kept.append(candidate)
    if mode == "best" and kept:
        top = max(c["reward"] for c in kept)
        kept = [next(c for c in kept if c["reward"] == top)]
    return kept


def best_by_score(kept: list[dict]) -> dict | None:
    """The kept candidate the reward model scores highest (the first among ties)."""
    if not kept:
        return None
    top = max(c["score"] for c in kept)
    return next(c for c in kept if c["score"] == top)


def conversation_record(record, response: str, *, out_dir: Path, **extra) -> dict:
    """An accepted response as a conversation line of `out_dir`'s JSONL. Media paths are
    written relative to `out_dir`, where the shard writer (and any later reader) resolves
    them, whatever directory the prompts were read from."""
    out = {"messages": [{"role": "user", "content": record.text},
                        {"role": "assistant", "content": response}],
           "source": record.source, **extra}
    base = Path(out_dir).resolve()
    for key, paths in (("images", record.images), ("videos", record.videos)):
        if paths:
            out[key] = [os.path.relpath(Path(p).resolve(), base) for p in paths]
    return out


def run_rft(options: RFTOptions) -> RFTReport:
    """Sample, verify, select and write shards (rank 0 writes; every rank returns the report)."""
    from megatron_keye.data.shards.writer import InputSpec, PreprocessConfig, preprocess
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.post_training.generate_cli import media_configs, saved_config
    from megatron_keye.post_training.generation import GenerationOptions
    from megatron_keye.post_training.prompts import build_prompt
    from megatron_keye.post_training.rl import read_prompt_file

    records = read_prompt_file(options.prompts)
    tokenizer = (KeyeTokenizer.from_dir(options.tokenizer) if options.tokenizer
                 else KeyeTokenizer.default())
    spec = RewardSpec(weights=dict(zip(options.reward_terms, options.reward_weights,
                                       strict=True)))
    image_config, video_config = media_configs(saved_config(options.checkpoint))
    prompts = [build_prompt(r.text, tokenizer=tokenizer, images=r.images, videos=r.videos,
                            chat=options.chat, image_config=image_config,
                            video_config=video_config) for r in records]
    generation = GenerationOptions(
        max_new_tokens=options.max_new_tokens, temperature=options.temperature,
        top_p=options.top_p, seed=options.seed, samples_per_prompt=options.samples,
        stop_token_ids=(tokenizer.eos_id, tokenizer.pad_id))
    kwargs = dict(checkpoint=options.checkpoint, prompts=prompts, options=generation,
                  tensor=options.tensor, pipeline=options.pipeline, pad_id=tokenizer.pad_id,
                  reward_model=options.reward_model, tokenizer_dir=options.tokenizer,
                  references=[tokenizer.encode(r.sample["answer"]) for r in records],
                  reward_batch_size=options.reward_batch_size)
    writer_rank = True
    if "RANK" in os.environ:
        result, scores = sample_and_score_rank(**kwargs)
        writer_rank = int(os.environ["RANK"]) == 0
    else:
        from megatron_keye.runtime.spawn import spawn_ranks

        world = options.nproc or options.tensor * options.pipeline
        result, scores = spawn_ranks(sample_and_score_rank, world,
                                     threads=max(1, (os.cpu_count() or 1) // world),
                                     **kwargs)[0]

    out = Path(options.out)
    per_source: dict[str, dict[str, int]] = {}
    kept_by_source: dict[str, list[dict]] = {}
    candidates: list[dict] = []
    k = options.samples
    references = scores[: len(records)] if scores is not None else None
    for p, record in enumerate(records):
        group = []
        for s in range(k):
            row = p * k + s
            tokens = result.row_tokens(row)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            score = scores[len(records) + row] if scores is not None else None
            reward, _ = combine(text, record.sample, spec, model_score=score)
            candidate = {"prompt": p, "sample": s, "tokens": tokens, "text": text,
                         "reward": reward, "accepted": reward >= options.success, "kept": False}
            if score is not None:
                candidate["score"] = score
            group.append(candidate)
        stats = per_source.setdefault(record.source, {"prompts": 0, "samples": 0,
                                                      "accepted": 0, "kept": 0})
        if options.replace_reference:
            stats.setdefault("replaced", 0)
            best = best_by_score(select(group, mode="all", success=options.success))
            replaced = best is not None and best["score"] > references[p]
            kept = [best] if replaced else []
            stats["replaced"] += int(replaced)
            answer = best["text"] if replaced else record.sample["answer"]
            written = [conversation_record(
                record, answer, out_dir=out, replaced_reference=replaced,
                reference_score=references[p],
                sample_score=None if best is None else best["score"])]
        else:
            kept = select(group, mode=options.mode, success=options.success)
            written = [conversation_record(record, c["text"], out_dir=out) for c in kept]
        for candidate in kept:
            candidate["kept"] = True
        candidates.extend(group)
        stats["prompts"] += 1
        stats["samples"] += k
        stats["accepted"] += sum(c["accepted"] for c in group)
        stats["kept"] += len(kept)
        kept_by_source.setdefault(record.source, []).extend(written)

    paths = {source: str(out / f"accepted-{source}.jsonl") for source in kept_by_source}
    index = out / "shards" / "rft.index.json"
    if writer_rank:
        out.mkdir(parents=True, exist_ok=True)
        for source, rows in kept_by_source.items():
            Path(paths[source]).write_text(
                "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        inputs = [InputSpec(path=Path(paths[s]), source=s) for s in sorted(kept_by_source)
                  if kept_by_source[s]]
        if inputs:
            preprocess(PreprocessConfig(inputs=inputs, output_dir=out / "shards", name="rft",
                                        tokenizer=options.tokenizer, progress=False,
                                        overwrite=True))
    if "RANK" in os.environ:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
    first = sorted(paths)[0] if paths else ""
    return RFTReport(per_source=per_source, accepted_path=paths.get(first, ""),
                     accepted_paths=paths, index_path=str(index), candidates=candidates,
                     reference_scores=references)


def sample_and_score_rank(*, reward_model: str | None, tokenizer_dir: str | None,
                          references: list[list[int]], reward_batch_size: int, **generate):
    """One rank: sample (`generate_cli.generate_rank`), then, with a reward model, score every
    reference answer and every sample in the same ranks and layout. Returns (the generation
    result, None or the scores: the references' in prompt order, then the samples' in row
    order), identical on every rank."""
    from megatron.core import parallel_state

    from megatron_keye.config.loading import ConfigError
    from megatron_keye.data.text.tokenizer import KeyeTokenizer
    from megatron_keye.post_training.generate_cli import generate_rank, saved_config
    from megatron_keye.post_training.reward_model import RewardModelScorer
    from megatron_keye.runtime.parallel import compute_device

    result = generate_rank(**generate)
    if reward_model is None:
        return result, None
    tokenizer = (KeyeTokenizer.from_dir(tokenizer_dir) if tokenizer_dir
                 else KeyeTokenizer.default())
    layout = {"tensor": generate["tensor"], "pipeline": generate["pipeline"],
              "virtual_pipeline": 1, "context": 1,
              "data": parallel_state.get_data_parallel_world_size()}
    scorer = RewardModelScorer.from_checkpoint(
        reward_model, field="--reward-model",
        policy_model=saved_config(generate["checkpoint"]).get("model") or {},
        tokenizer=tokenizer, device=compute_device(), layout=layout,
        micro_batch_size=reward_batch_size)
    prompts = generate["prompts"]
    if not scorer.reads_media and any(p.vision_grids is not None for p in prompts):
        raise ConfigError("--reward-model", f"{reward_model} has no vision tower but some "
                          f"prompts have images/videos")
    k = generate["options"].samples_per_prompt
    items = [(prompt, answer) for prompt, answer in zip(prompts, references, strict=True)]
    items += [(prompts[row // k], result.row_tokens(row)) for row in range(result.tokens.size(0))]
    return result, scorer.score(items)


def _reward_arg(text: str) -> tuple[str, float]:
    name, _, weight = text.partition("=")
    try:
        return name, float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--reward {text!r}: expected NAME[=WEIGHT]") from None


def cli_main(argv: list[str]) -> int:
    """`megatron-keye rft ...` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="megatron-keye rft",
                                     description="Rejection-sampling fine-tuning data: sample k "
                                     "responses per prompt, keep the verified ones, write SFT "
                                     "shards.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL: prompt, answer, image(s), ...")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=8, help="k responses per prompt")
    parser.add_argument("--mode", choices=MODES, default="all")
    parser.add_argument("--reward", action="append", type=_reward_arg, default=None,
                        metavar="NAME[=WEIGHT]", help="verifier term (default: exact=1)")
    parser.add_argument("--success", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=None)
    parser.add_argument("--parallel.tensor", dest="tensor", type=int, default=1)
    parser.add_argument("--parallel.pipeline", dest="pipeline", type=int, default=1)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--raw", action="store_true", help="no chat template")
    parser.add_argument("--reward-model", default=None,
                        help="value-head checkpoint scoring samples and references (the "
                             "'model' reward term; needed by --replace-reference)")
    parser.add_argument("--replace-reference", action="store_true",
                        help="write each prompt once: its reference answer, or the accepted "
                             "sample the reward model scores higher than the reference")
    parser.add_argument("--reward-batch-size", type=int, default=8,
                        help="rows per reward-model forward")
    args = parser.parse_args(argv)
    terms = args.reward or [("exact", 1.0)]
    report = run_rft(RFTOptions(
        checkpoint=args.checkpoint, prompts=args.prompts, out=args.out, samples=args.samples,
        mode=args.mode, reward_terms=[t for t, _ in terms], reward_weights=[w for _, w in terms],
        success=args.success, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, tensor=args.tensor,
        pipeline=args.pipeline, nproc=args.nproc, tokenizer=args.tokenizer, chat=not args.raw,
        reward_model=args.reward_model, replace_reference=args.replace_reference,
        reward_batch_size=args.reward_batch_size))
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.table())
        print(f"shards: {report.index_path}" if report.accepted_paths else
              "no sample was accepted: no shards written")
    return 0
