"""`megatron-keye` command line: train, convert, config.

    megatron-keye train --recipe tiny-cpu-text --nproc 4 --parallel.tensor=2 --parallel.pipeline=2
    megatron-keye convert import --hf-dir HF --out CKPT --tensor 2 --pipeline 2
    megatron-keye convert export --checkpoint CKPT --out HF --tokenizer DIR
    megatron-keye config --recipe tiny-cpu-text --world-size 4   # resolve and validate only
    megatron-keye demo                                            # the CPU demo (make demo)
    megatron-keye plan --flavor 8b --seq 131072 --gpus 8          # rank TP/CP/PP/DP layouts
    megatron-keye preprocess --input chat.jsonl --output-dir shards/  # JSONL + media -> shards
    megatron-keye merge --method ties --base PRE --model A --model B --density 0.2 --out OUT
    megatron-keye generate --checkpoint CKPT --prompt "Describe it." --image cat.png  # KV cache
    megatron-keye score --checkpoint RM --data pairs.jsonl        # reward model pair accuracy
    megatron-keye reference-logprobs --recipe tiny-cpu-mpo --checkpoint REF  # DPO/MPO sidecars
    megatron-keye rft --checkpoint CKPT --prompts p.jsonl --out rft/  # rejection sampling -> SFT shards
    megatron-keye pipeline tiny-cpu-stage1 tiny-cpu-stage2 tiny-cpu-stage3  # stages in order
    megatron-keye launch --dry-run --recipe keye8b-stage3 --nodes 8 --gpus-per-node 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from megatron_keye.config import load_config, validate
from megatron_keye.config.arguments import config_help, split_recipe_args, wants_help
from megatron_keye.config.loading import ConfigError
from megatron_keye.logging_setup import configure_logging

TRAIN_USAGE = """usage: megatron-keye train [--nproc N] [--recipe NAME|--config PATH] [--section.field=value ...]

Train with a recipe (megatron_keye/recipes/*.yaml or a YAML path) and dotted overrides.
--nproc N starts N local processes with torchrun (laptops, one node); under torchrun or srun
leave it out. The config is resolved and validated for the world size before anything starts.
Sending SIGTERM or SIGUSR1 to the training processes saves a checkpoint and exits 0.

config fields (section.field, type, default):
"""

CONFIG_USAGE = """usage: megatron-keye config [--world-size N] [--recipe NAME|--config PATH] [--section.field=value ...]

Print the resolved config as YAML; with --world-size, also validate the layout for it.

config fields (section.field, type, default):
"""


def _train(argv: list[str]) -> int:
    if wants_help(argv):
        print(TRAIN_USAGE + config_help())
        return 0
    nproc = None
    if argv and argv[0].startswith("--nproc"):
        if "=" in argv[0]:
            nproc, argv = _int_arg("--nproc", argv[0].split("=", 1)[1]), argv[1:]
        elif len(argv) > 1:
            nproc, argv = _int_arg("--nproc", argv[1]), argv[2:]
        else:
            raise ConfigError("--nproc", "needs a value")
    # Resolve and validate here, once, so a config error is one line and nothing is spawned.
    recipe, overrides = split_recipe_args(argv)
    world_size = nproc if nproc and "RANK" not in os.environ else int(
        os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    )
    validate(load_config(recipe, overrides), world_size)
    if nproc and "RANK" not in os.environ:
        # A single-node launch for laptops and tests; clusters use torchrun/srun directly.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", "-m", "megatron_keye.train", *argv]
        threads = max(1, (os.cpu_count() or 1) // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        return subprocess.call(command, env=env)
    from megatron_keye.train import main as train_main

    return train_main(argv)


def _int_arg(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {value!r}") from None


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-keye convert")
    sub = parser.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="HF Qwen3ForCausalLM / Keye-VL safetensors -> native checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--tensor", type=int, default=1)
    imp.add_argument("--pipeline", type=int, default=1)
    imp.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    imp.add_argument("--vision-dir", default=None,
                     help="a SigLIP vision tower directory to combine with the Qwen3 --hf-dir "
                          "into one Keye-VL checkpoint (stage 1; the projector starts fresh)")
    exp = sub.add_parser("export", help="native checkpoint -> HF safetensors + config.json")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint or a save dir (uses latest)")
    exp.add_argument("--out", required=True)
    exp.add_argument("--tokenizer", help="tokenizer directory to ship with the export")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="default: the HF source's dtype (imported models), else the run's")
    args = parser.parse_args(argv)
    from megatron_keye import convert

    if args.direction == "import":
        convert.import_hf(args.hf_dir, args.out, tensor=args.tensor, pipeline=args.pipeline,
                          precision=args.precision, vision_dir=args.vision_dir)
        print(f"wrote native checkpoint to {args.out}")
    else:
        out = convert.export_hf(args.checkpoint, args.out, tokenizer_dir=args.tokenizer,
                                dtype=args.dtype)
        print(f"wrote Hugging Face model to {out}")
    return 0


def _config(argv: list[str]) -> int:
    import yaml

    from megatron_keye.config import config_to_dict

    if wants_help(argv):
        print(CONFIG_USAGE + config_help())
        return 0
    world = None
    if "--world-size" in argv:
        i = argv.index("--world-size")
        if i + 1 >= len(argv):
            raise ConfigError("--world-size", "needs a value")
        world, argv = _int_arg("--world-size", argv[i + 1]), argv[:i] + argv[i + 2:]
    recipe, overrides = split_recipe_args(argv)
    config = load_config(recipe, overrides)
    if world is not None:
        validate(config, world)
    yaml.safe_dump(config_to_dict(config), sys.stdout, sort_keys=False)
    return 0


def _demo(argv: list[str]) -> int:
    from megatron_keye import demo
    from megatron_keye.demo import pipeline

    if wants_help(argv):
        print("usage: megatron-keye demo [--text] [--steps RECIPE=N ...] [--corpus-scale F]\n\n"
              + (pipeline.__doc__ or "").strip() + "\n\n--text: " + (demo.__doc__ or "").strip())
        return 0
    return demo.main(argv)


def _plan(argv: list[str]) -> int:
    from megatron_keye.planning import cli_main

    return cli_main(argv)


def _merge(argv: list[str]) -> int:
    from megatron_keye.post_training.merging import cli_main

    return cli_main(argv)


def _score(argv: list[str]) -> int:
    from megatron_keye.post_training.scoring import cli_main

    return cli_main(argv)


def _generate(argv: list[str]) -> int:
    from megatron_keye.post_training.generate_cli import main as generate_main

    return generate_main(argv)


def _reference_logprobs(argv: list[str]) -> int:
    from megatron_keye.post_training.reference_pass import cli_main

    return cli_main(argv)


def _rft(argv: list[str]) -> int:
    from megatron_keye.post_training.rft import cli_main

    return cli_main(argv)


def _preprocess(argv: list[str]) -> int:
    from megatron_keye.data.shards.writer import cli_main

    return cli_main(argv)


def _pipeline(argv: list[str]) -> int:
    from megatron_keye.stages import cli_main

    return cli_main(argv)


def _launch(argv: list[str]) -> int:
    from megatron_keye.launch import cli_main

    return cli_main(argv)


COMMANDS = {"train": _train, "convert": _convert, "config": _config, "demo": _demo,
            "generate": _generate,
            "plan": _plan, "merge": _merge, "preprocess": _preprocess, "pipeline": _pipeline,
            "launch": _launch, "score": _score, "rft": _rft,
            "reference-logprobs": _reference_logprobs}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}; `megatron-keye COMMAND --help` for each")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\ncommands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    configure_logging()
    from megatron_keye.runtime.spawn import RankError

    try:
        return COMMANDS[argv[0]](argv[1:])
    # ConfigError and friends, a missing file or directory, or any of these raised inside a
    # spawned rank: one clear line, no traceback.
    except (ValueError, OSError, RankError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
