"""`megatron-keye demo`: the whole Keye pipeline on CPU (`pipeline.py`); `--text` runs the
text-only decoder demo (`text.py`, `make demo-text`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-keye demo",
                                     description="the Keye pipeline end to end on CPU")
    parser.add_argument("--text", action="store_true",
                        help="the text-only decoder demo instead (make demo-text)")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--steps", action="append", default=[], metavar="RECIPE=N",
                        help="train_iters of one stage's recipe (repeatable)")
    parser.add_argument("--corpus-scale", type=float, default=1.0)
    args, rest = parser.parse_known_args(argv)
    if args.text:
        from megatron_keye.demo import text

        return text.main([*rest, "--output", "outputs/demo-text"]
                         if args.output == "outputs/demo" else [*rest, "--output", args.output])
    if rest:
        parser.error(f"unknown arguments {rest}")
    from megatron_keye.demo.pipeline import DemoOptions, run

    steps = dict(DemoOptions().steps)
    for item in args.steps:
        recipe, _, value = item.partition("=")
        steps[recipe] = int(value)
    return run(DemoOptions(output=Path(args.output), steps=steps,
                           corpus_scale=args.corpus_scale))
