"""The whole Keye pipeline on the embedded CPU default (`make demo` / `megatron-keye demo`).

1. Write a synthetic multimodal corpus (colour-banded images with captions, tinted multi-scene
   videos, text, image Q&A conversations, preference pairs) and preprocess it into WebDataset
   shards, one shard set per source.
2. Write random tiny Qwen3 and SigLIP models in HF format and import them into one Keye-VL
   checkpoint, as a real stage 1 starts (`convert import --hf-dir --vision-dir`).
3. `megatron-keye pipeline` over the tiny recipes: stage 1 (projector only, DP=2), stage 2 (all,
   DP=2), stage 3 (4x the sequence, RoPE base 8e6, CP=2 x PP=2), SFT (TP=2 x DP=2), MPO (with a
   frozen reference) and a reward model (value head, from stage 3), each a real torchrun launch
   from its recipe's checkpoint.
4. Export the result to HF, import it back, and answer one image + video prompt with
   `megatron-keye generate` from both: the tokens must agree.
It prints a summary per stage (steps, loss first -> last, tokens/s, skipped samples, layout)
and writes a loss plot per stage (PNG) next to its metrics and wandb offline logs.
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
          "tiny-cpu-mpo", "tiny-cpu-rm")
GENERATES = "tiny-cpu-mpo"  # the policy the demo exports and asks (the RM only scores)
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
                                                           "tiny-cpu-rm": 8})
    corpus_scale: float = 1.0  # multiplies the number of records of every source
    fresh: bool = True  # remove an earlier demo's outputs first


@dataclass
class StageSummary:
    name: str
    losses: list[float]
    tokens_per_s: float
    skipped: int
    layout: str

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


def stage_summary(stage_dir: Path, name: str, layout: str) -> StageSummary:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if "loss" in r]
    skipped = int(sum(v for r in rows for k, v in r.items() if k.startswith("data/skipped/")))
    return StageSummary(name=name, losses=[r["loss"] for r in rows],
                        tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
                        skipped=skipped, layout=layout)


def _stage_dirs(out: Path) -> dict[str, tuple[str, Path, str]]:
    """recipe -> (stage name, output dir, layout) from the resolved recipes."""
    from megatron_keye.config import load_config

    found = {}
    for recipe in STAGES:
        config = load_config(recipe, [])
        p = config.parallel
        layout = (f"TP{p.tensor} PP{p.pipeline} CP{p.context} DP{p.data} | seq "
                  f"{config.data.seq_length}, RoPE base {config.model.rope_base:g}")
        found[recipe] = (config.stage.name, Path(config.logging.output_dir), layout)
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
    """Run the demo; returns a process exit code (non-zero if a stage's loss did not fall)."""
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
    print("\n== 3. stages: " + " -> ".join(STAGES), flush=True)
    overrides = [f"--{STAGES.index(recipe) + 1}:schedule.train_iters={steps}"
                 for recipe, steps in options.steps.items()]
    stage_names = _stage_dirs(out)
    pipeline = subprocess.run([sys.executable, "-m", "megatron_keye.cli", "pipeline", *STAGES,
                               *overrides])
    if pipeline.returncode != 0:
        raise SystemExit(f"demo: the stage pipeline failed with exit code {pipeline.returncode}")

    summaries = []
    for recipe in STAGES:
        name, stage_dir, layout = stage_names[recipe]
        summary = stage_summary(stage_dir, name, layout)
        metrics = [json.loads(line) for line in
                   (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        metrics = [m for m in metrics if "loss" in m]
        write_loss_plot(stage_dir / "loss.png", [m["step"] for m in metrics],
                        [m["loss"] for m in metrics], title=f"{name}: loss")
        summaries.append(summary)

    print("\n== 4. export to HF, import back, answer an image + video prompt", flush=True)
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
    print(f"{'stage':<20} {'steps':>5} {'loss first -> last':>20} {'tok/s':>8} {'skipped':>8}"
          f"  layout", flush=True)
    for s in summaries:
        print(f"{s.name:<20} {s.steps:>5} {s.first_loss:>9.3f} -> {s.last_loss:<8.3f} "
              f"{s.tokens_per_s:>8.0f} {s.skipped:>8}  {s.layout}", flush=True)
    falling = all(s.fell for s in summaries)
    print(f"loss fell in every stage (second half's mean below the first half's): "
          f"{'yes' if falling else 'NO'}; loss plots: "
          f"{', '.join(str(stage_names[r][1] / 'loss.png') for r in STAGES)}", flush=True)
    print(f"demo finished in {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if falling and same else 1
