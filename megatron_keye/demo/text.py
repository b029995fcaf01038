"""The main job on the embedded CPU default, end to end (`make demo` / `megatron-keye demo`).

1. Train the tiny decoder on a synthetic text corpus with 4 gloo processes at TP=2 x PP=2
   (sequence parallel on) and stop with a checkpoint partway (`schedule.exit_at_iteration`).
2. Resume the same run as DP=2 x TP=2: a different layout, loading weights, ZeRO-1 optimizer
   state, scheduler and data position from the checkpoint, and train to the end.
3. Check that the loss clearly fell; export the final checkpoint to Hugging Face format with the
   tokenizer; load it with `transformers` and generate text.
Each training phase is a real `torchrun` launch, exactly as a user would start it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RECIPE = "tiny-cpu-text"
PROMPTS = ("Mia paints", "Twelve lamps", "Tara saw five tickets")


def _train(nproc: int, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "megatron_keye.cli", "train", "--nproc", str(nproc),
               "--recipe", RECIPE, *overrides]
    print("$", " ".join(command[2:]), flush=True)
    code = subprocess.call(command)
    if code != 0:
        raise SystemExit(f"training phase failed with exit code {code}")


def _losses(metrics_file: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def run(*, output: str = "outputs/demo", steps: int = 300, switch_at: int = 150,
        nproc: int = 4) -> int:
    """Run the demo; returns a process exit code (non-zero if the loss did not fall)."""
    out = Path(output)
    if out.exists():
        shutil.rmtree(out)  # a fresh run every time; the demo never resumes a stale one
    common = [f"--checkpoint.save_dir={out}/checkpoints", f"--logging.output_dir={out}",
              f"--schedule.train_iters={steps}", "--logging.wandb_mode=disabled"]

    print(f"\n== phase 1: TP=2 x PP=2 (sequence parallel), steps 1..{switch_at}", flush=True)
    _train(nproc, [*common, "--parallel.tensor=2", "--parallel.pipeline=2",
                   f"--schedule.exit_at_iteration={switch_at}"])
    print(f"\n== phase 2: resume as DP=2 x TP=2, steps {switch_at + 1}..{steps}", flush=True)
    _train(nproc, [*common, "--parallel.tensor=2", "--parallel.pipeline=1"])

    losses = _losses(out / "metrics.jsonl")
    first, last = losses[0], losses[-1]
    print(f"\n== loss: step {first[0]}: {first[1]:.3f} -> step {last[0]}: {last[1]:.3f}")
    fell = last[1] < 0.6 * first[1]
    print("   the loss fell clearly" if fell else "   the loss did NOT fall enough", flush=True)

    print("\n== export to Hugging Face format", flush=True)
    from megatron_keye.convert import export_hf
    from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR

    hf_dir = export_hf(str(out / "checkpoints"), str(out / "hf"),
                       tokenizer_dir=str(DEFAULT_TOKENIZER_DIR))
    print(f"   wrote {hf_dir}: {sorted(os.listdir(hf_dir))}")

    print("\n== generate with transformers", flush=True)
    _generate(hf_dir)
    return 0 if fell else 1


def _generate(hf_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        print(f"   {prompt!r} -> {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-keye demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--switch-at", type=int, default=150)
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args(argv)
    return run(output=args.output, steps=args.steps, switch_at=args.switch_at, nproc=args.nproc)


if __name__ == "__main__":
    sys.exit(main())
