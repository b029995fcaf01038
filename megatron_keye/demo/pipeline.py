"""The whole Keye pipeline on the embedded CPU default (`make demo` / `megatron-keye demo`).

1. Write a synthetic multimodal corpus (colour-banded images with captions, tinted multi-scene
   videos, text, image Q&A conversations, preference pairs) and preprocess it into WebDataset
   shards, one shard set per source.
2. Write random tiny Qwen3 and SigLIP models in HF format and import them into one Keye-VL
   checkpoint, as a real stage 1 starts (`convert import --hf-dir --vision-dir`).
3. Write the RL prompts (`data/rl_prompts.py`): "How many colour bands does the picture show?"
   about generated images of 1-4 bands, and small sums, each with a numeric answer and hints.
4. `megatron-keye pipeline` over the tiny recipes: stage 1 (projector only, DP=2), stage 2 (all,
   DP=2), stage 3 (4x the sequence, RoPE base 8e6, CP=2 x PP=2), SFT (TP=2 x DP=2), MPO (with a
   frozen reference), a reward model (value head, from stage 3) and GSPO (from MPO: rollouts
   from the policy, verifiable rewards, group advantages), each a real torchrun launch from its
   recipe's checkpoint. The RM runs before GSPO, as in the paper's order (an RL stage may score
   with it), and the chain ends with the policy the demo exports.
5. Export the GSPO policy to HF, import it back, and answer one image + video prompt with
   `megatron-keye generate` from both: the tokens must agree.
It prints a summary per stage (steps, loss first -> last, tokens/s, skipped samples, layout;
for GSPO the mean reward of its first -> last rollout batch instead, its loss is not meant to
fall) and writes a loss plot per stage (PNG, and GSPO's reward per rollout batch) next to its
metrics and wandb offline logs. It exits non-zero unless the loss fell in every other stage, the
reward rose in GSPO and both checkpoints generate the same tokens.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("tiny-cpu-stage1", "tiny-cpu-stage2", "tiny-cpu-stage3", "tiny-cpu-sft",
          "tiny-cpu-mpo", "tiny-cpu-rm", "tiny-cpu-gspo")
GENERATES = "tiny-cpu-gspo"  # the policy the demo exports and asks (the RM only scores)
RL_STAGE = "tiny-cpu-gspo"  # judged by its reward, not its loss
# The GSPO stage's prompts (outputs/demo/rl, as tiny-cpu-gspo.yaml names them): band counts of
# generated images and sums up to 4 + 4, so every answer is a single digit.
RL_PROMPTS = {"colour": 0, "count": 32, "arithmetic": 32, "max_operand": 4}
SOURCES = {"image": "captions", "video": "videos", "text": "text",
           "conversations": "conversations", "pairs": "pairs", "reward_pairs": "pairs"}
QUESTION = "Which colours does the picture show, and which colours appear in the video?"


@dataclass(kw_only=True)
class DemoOptions:
    """What the demo runs; the defaults fit ~10 minutes on 2 cores."""

    output: Path = Path("outputs/demo")  # the recipes name outputs/demo/...; keep in step
    # recipe -> train_iters override (the rest keep their recipe's)
    steps: dict[str, int] = field(default_factory=lambda: {"tiny-cpu-sft": 12,
                                                           "tiny-cpu-mpo": 10,
                                                           "tiny-cpu-rm": 8,
                                                           "tiny-cpu-gspo": 32})
    corpus_scale: float = 1.0  # multiplies the number of records of every source
    fresh: bool = True  # remove an earlier demo's outputs first


@dataclass
class StageSummary:
    name: str
    losses: list[float]
    tokens_per_s: float
    skipped: int
    layout: str
    # RL stages: the mean reward of each rollout batch, in order (None for other stages)
    rewards: list[float] | None = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]

    @property
    def fell(self) -> bool:
        """The second half's mean loss is below the first half's (single steps are noisy:
        each step sees other samples)."""
        half = max(1, len(self.losses) // 2)
        first, second = self.losses[:half], self.losses[-half:]
        return sum(second) / len(second) < sum(first) / len(first)

    @property
    def reward_halves(self) -> tuple[float, float]:
        """Mean reward of the first and of the second half of the rollout batches."""
        half = max(1, len(self.rewards) // 2)
        first, second = self.rewards[:half], self.rewards[-half:]
        return sum(first) / len(first), sum(second) / len(second)

    @property
    def rose(self) -> bool:
        """The second half's mean reward is above the first half's."""
        first, second = self.reward_halves
        return second > first

    @property
    def passed(self) -> bool:
        return self.rose if self.rewards is not None else self.fell


def _run(command: list[str], *, what: str) -> subprocess.CompletedProcess:
    print("$ megatron-keye", " ".join(command), flush=True)
    done = subprocess.run([sys.executable, "-m", "megatron_keye.cli", *command], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        print(done.stdout[-6000:], flush=True)
        raise SystemExit(f"demo: {what} failed with exit code {done.returncode}")
    return done


def write_shards(out: Path, scale: float) -> None:
    """Corpus → one shard set per source under out/shards/<source>."""
    from megatron_keye.data.demo_corpus import DemoCorpusConfig, write_demo_corpus
    from megatron_keye.data.shards.writer import cli_main

    base = DemoCorpusConfig()
    config = DemoCorpusConfig(**{k: max(2, int(v * scale)) if k != "seed" else v
                                 for k, v in base.__dict__.items()})
    corpus = write_demo_corpus(out / "corpus", config)
    for source, file_key in SOURCES.items():
        code = cli_main(["--input", f"{source}={corpus.files[file_key]}",
                         "--output-dir", str(out / "shards" / source),
                         "--media-root", str(corpus.media_root), "--workers", "0",
                         "--no-progress"])
        if code != 0:
            raise SystemExit(f"demo: preprocessing {source} failed (exit {code})")


def rollout_rewards(rows: list[dict], minibatches: int) -> tuple[list[int], list[float]]:
    """(first step, rl/reward_mean) of each rollout batch: every step logs the metrics of the
    batch it trains on, and batch b trains steps b*minibatches+1 .. (b+1)*minibatches."""
    found: dict[int, tuple[int, float]] = {}
    for r in rows:
        if "rl/reward_mean" in r:
            found.setdefault((r["step"] - 1) // minibatches, (r["step"], r["rl/reward_mean"]))
    ordered = [found[b] for b in sorted(found)]
    return [step for step, _ in ordered], [reward for _, reward in ordered]


def stage_summary(stage_dir: Path, name: str, layout: str, *,
                  minibatches: int | None = None) -> StageSummary:
    """A stage's figures from its metrics.jsonl; `minibatches` (optimizer steps per rollout
    batch) marks an RL stage, whose rollout batches' mean rewards are read too."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if "loss" in r]
    skipped = int(sum(v for r in rows for k, v in r.items() if k.startswith("data/skipped/")))
    rewards = rollout_rewards(rows, minibatches)[1] if minibatches else None
    if minibatches and not rewards:
        raise SystemExit(f"demo: {stage_dir}/metrics.jsonl logs no rl/reward_mean")
    return StageSummary(name=name, losses=[r["loss"] for r in rows],
                        tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
                        skipped=skipped, layout=layout, rewards=rewards)


def _stage_dirs(out: Path) -> dict[str, tuple[str, Path, str, int | None]]:
    """recipe -> (stage name, output dir, layout, RL minibatches or None) from the recipes."""
    from megatron_keye.config import load_config

    found = {}
    for recipe in STAGES:
        config = load_config(recipe, [])
        p = config.parallel
        layout = (f"TP{p.tensor} PP{p.pipeline} CP{p.context} DP{p.data} | seq "
                  f"{config.data.seq_length}, RoPE base {config.model.rope_base:g}")
        minibatches = config.rl.minibatches if config.stage.loss_head == "gspo" else None
        found[recipe] = (config.stage.name, Path(config.logging.output_dir), layout, minibatches)
    return found


def _answer(checkpoint: Path, media: list[str]) -> list[int]:
    done = _run(["generate", "--checkpoint", str(checkpoint), "--prompt", QUESTION, *media,
                 "--max-new-tokens", "16", "--json"], what=f"generate from {checkpoint}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"demo: generate from {checkpoint} printed no sample")
    print(f"   answer: {lines[0].get('text', '')!r}", flush=True)
    return lines[0]["tokens"]


def run(options: DemoOptions) -> int:
    """Run the demo; returns a process exit code (non-zero if a stage's loss did not fall, the
    GSPO reward did not rise or the HF round trip generates other tokens)."""
    from megatron_keye.data.rl_prompts import RLPromptConfig, write_rl_prompts
    from megatron_keye.demo.hf_sources import write_random_hf_sources
    from megatron_keye.demo.plot import write_loss_plot

    out = options.output
    started = time.perf_counter()
    if options.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    print("\n== 1. synthetic corpus -> shards", flush=True)
    write_shards(out, options.corpus_scale)
    print("\n== 2. random HF Qwen3 + SigLIP -> one Keye-VL checkpoint", flush=True)
    lm_dir, vision_dir = write_random_hf_sources(out / "hf_sources")
    _run(["convert", "import", "--hf-dir", str(lm_dir), "--vision-dir", str(vision_dir),
          "--out", str(out / "init")], what="convert import")
    print("\n== 3. RL prompts: band counts of generated images, small sums", flush=True)
    print(f"   {write_rl_prompts(out / 'rl', RLPromptConfig(**RL_PROMPTS))}", flush=True)
    print("\n== 4. stages: " + " -> ".join(STAGES), flush=True)
    overrides = [f"--{STAGES.index(recipe) + 1}:schedule.train_iters={steps}"
                 for recipe, steps in options.steps.items()]
    stage_names = _stage_dirs(out)
    pipeline = subprocess.run([sys.executable, "-m", "megatron_keye.cli", "pipeline", *STAGES,
                               *overrides])
    if pipeline.returncode != 0:
        raise SystemExit(f"demo: the stage pipeline failed with exit code {pipeline.returncode}")

    summaries = []
    plots = []
    for recipe in STAGES:
        name, stage_dir, layout, minibatches = stage_names[recipe]
        summary = stage_summary(stage_dir, name, layout, minibatches=minibatches)
        metrics = [json.loads(line) for line in
                   (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        metrics = [m for m in metrics if "loss" in m]
        plots.append(write_loss_plot(stage_dir / "loss.png", [m["step"] for m in metrics],
                                     [m["loss"] for m in metrics], title=f"{name}: loss"))
        if minibatches:
            steps, rewards = rollout_rewards(metrics, minibatches)
            plots.append(write_loss_plot(
                stage_dir / "reward.png", steps, rewards,
                title=f"{name}: mean reward of each rollout batch (at its first step)"))
        summaries.append(summary)

    print("\n== 5. export to HF, import back, answer an image + video prompt", flush=True)
    final = stage_names[GENERATES][1] / "checkpoints"
    _run(["convert", "export", "--checkpoint", str(final), "--out", str(out / "hf")],
         what="convert export")
    _run(["convert", "import", "--hf-dir", str(out / "hf"), "--out", str(out / "reimported")],
         what="convert import of the export")
    corpus = out / "corpus" / "media"
    media = ["--image", str(sorted((corpus / "images").glob("chat_*.png"))[0]),
             "--video", str(sorted((corpus / "videos").glob("*.mp4"))[0])]
    native = _answer(final, media)
    round_trip = _answer(out / "reimported", media)
    same = native == round_trip
    print(f"   native and HF-round-tripped checkpoints generate "
          f"{'the same tokens' if same else 'DIFFERENT tokens'}", flush=True)

    print("\n== summary", flush=True)
    print(f"{'stage':<20} {'steps':>5}  {'of':<6} {'first -> last':>17} {'tok/s':>8} "
          f"{'skipped':>8}  layout", flush=True)
    for s in summaries:
        what, first, last = (("reward", s.rewards[0], s.rewards[-1]) if s.rewards is not None
                             else ("loss", s.first_loss, s.last_loss))
        print(f"{s.name:<20} {s.steps:>5}  {what:<6} {first:>6.3f} -> {last:<7.3f} "
              f"{s.tokens_per_s:>8.0f} {s.skipped:>8}  {s.layout}", flush=True)
    falling = all(s.fell for s in summaries if s.rewards is None)
    print(f"loss fell in every stage but GSPO (second half's mean below the first half's): "
          f"{'yes' if falling else 'NO'}", flush=True)
    rising = True
    for s in summaries:
        if s.rewards is not None:
            first, second = s.reward_halves
            half = max(1, len(s.rewards) // 2)
            rising = rising and s.rose
            print(f"reward rose in {s.name} (mean of the last {half} rollout batches "
                  f"{second:.3f} vs the first {half} {first:.3f}): "
                  f"{'yes' if s.rose else 'NO'}", flush=True)
    print(f"plots: {', '.join(str(p) for p in plots)}", flush=True)
    print(f"demo finished in {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if falling and rising and same else 1
