"""Multi-stage runs: `megatron-keye pipeline RECIPE... [options] [overrides]`.

A *stage* is one recipe (plus overrides) trained to its `schedule.train_iters`; Keye's
pre-training is three of them (projector alignment, multi-task, long-context annealing), each
starting from the previous stage's checkpoint, usually in another layout, with its own sequence
length and RoPE base (`data.seq_length`, `model.rope_base`) and its own choice of what to keep
(`checkpoint.load_state`: resume | weights+optimizer | weights).

`run_pipeline` runs the stages in order, each in a fresh `torchrun` (a stage may need another
world size than the one before), and skips every stage whose own checkpoint already reached
`train_iters`. A stage stopped mid-way (a kill, a preemption, slurm's SIGUSR1 before the time
limit) resumes from its save_dir's `latest` the next time the same command runs, because the
trainer resumes a save_dir that holds checkpoints before it looks at `checkpoint.load`. So one
command (re)starts a whole multi-stage run; `--status` and `--progress` report where it stands.

Everything is checked before the first stage starts: every stage's config for its world size,
distinct save dirs, a `checkpoint.load` that exists or that an earlier stage writes, and that a
weights+optimizer transition keeps the trainable set (Adam state of other parameters cannot
load).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_keye.config import load_config, validate
from megatron_keye.config.loading import ConfigError, recipe_path
from megatron_keye.config.schema import TrainConfig

log = logging.getLogger(__name__)

# torchrun forwards these to every rank (SIGUSR1 is slurm's warning before the time limit; the
# trainer saves at the next step boundary and exits 0 on it and on SIGTERM).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Seconds torchrun gives ranks to save after a forwarded signal before it kills them (slurm's
# --signal=USR1@120 leaves 120 s).
SHUTDOWN_TIMEOUT_S = 110
NOT_FINISHED = 3  # exit status of --status/--progress while some stage is unfinished

USAGE = """usage: megatron-keye pipeline RECIPE [RECIPE ...] [options] [--section.field=value ...]
                              [--K:section.field=value ...]

Run training stages in order, each from the previous stage's checkpoint, skipping finished
stages (their checkpoint reached schedule.train_iters); an interrupted stage resumes from its
save_dir's latest checkpoint. Run the same command again to continue a stopped run.

options:
  --nproc N               processes per stage on this machine (default: from the recipe's
                          parallel degrees, which then needs parallel.data > 0)
  --nnodes N --nproc-per-node G --node-rank R --rdzv-endpoint HOST:PORT [--rdzv-id ID]
                          multi-node: one pipeline per node (srun --ntasks-per-node=1), each
                          stage a torchrun with c10d rendezvous on HOST (PORT + stage index)
  --run-dir DIR           every stage's checkpoints in DIR/<K>-<stage.name>/checkpoints and
                          logs in DIR/<K>-<stage.name>; a stage whose checkpoint.load is unset
                          or names the previous recipe's save_dir loads the previous stage's
  --status                print each stage's state; exit 0 when all are finished, else 3
  --progress              print the checkpointed iterations summed over stages (one number);
                          exit 0 when all are finished, else 3 (for sbatch requeue logic)
  --dry-run               print the stages, their state and the commands; start nothing
overrides:
  --section.field=value   applies to every stage
  --K:section.field=value applies to stage K only (K = 1-based index or the stage's
                          stage.name)
"""


@dataclass(kw_only=True)
class PipelineOptions:
    """What `megatron-keye pipeline` was asked besides the recipes and overrides."""

    nproc: int | None = None
    nnodes: int = 1
    nproc_per_node: int | None = None
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "megatron-keye"
    run_dir: str | None = None
    mode: str = "run"  # run | status | progress | dry-run


@dataclass(kw_only=True)
class Stage:
    """One resolved stage: its recipe, the overrides it runs with, and its config."""

    index: int  # 1-based
    recipe: str
    overrides: list[str] = field(default_factory=list)
    config: TrainConfig

    @property
    def name(self) -> str:
        return self.config.stage.name

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name}, {Path(self.recipe).stem})"

    @property
    def save_dir(self) -> str:
        return self.config.checkpoint.save_dir or ""

    @property
    def train_iters(self) -> int:
        return self.config.schedule.train_iters

    def iteration(self) -> int | None:
        """The iteration of this stage's newest complete checkpoint (None: none yet)."""
        return checkpoint_iteration(self.save_dir)

    def finished(self) -> bool:
        done = self.iteration()
        return done is not None and done >= self.train_iters

    def train_args(self) -> list[str]:
        """Arguments of `python -m megatron_keye.train` for this stage."""
        return ["--recipe", self.recipe, *(f"--{o}" for o in self.overrides)]


# ----------------------------------------------------------------------------- state on disk
def checkpoint_iteration(save_dir: str | os.PathLike | None) -> int | None:
    """Iteration of the checkpoint a save dir's `latest` names, or None when it has none.

    Reads only the pointer and the checkpoint's `metadata.json` (no torch import), so the
    launcher and sbatch scripts can ask cheaply. A pointer to a missing checkpoint is an error.
    """
    if not save_dir:
        return None
    root = Path(save_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not any((root / prefix / "metadata.json").exists() for prefix in (name, f".old_{name}")):
        raise FileNotFoundError(f"{pointer} names {name}, which is not a checkpoint")
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise FileNotFoundError(f"{pointer}: cannot read an iteration from {name!r}") from None


def saved_run_config(path: str | os.PathLike) -> dict | None:
    """The resolved config saved with a checkpoint (a checkpoint dir or a save dir), if any."""
    root = Path(path)
    directory = root
    if not (root / "metadata.json").exists() and (root / "latest").exists():
        directory = root / (root / "latest").read_text().strip()
    config_file = directory / "config.yaml"
    if not config_file.exists():
        return None
    with open(config_file) as f:
        return yaml.safe_load(f)


def _trainable_signature(config: dict) -> dict:
    """What decides which parameters an optimizer holds state for."""
    model, stage = config.get("model") or {}, config.get("stage") or {}
    vision = model.get("vision")
    return {
        "stage.freeze": sorted(stage.get("freeze") or []),
        "model.vision": None if vision is None else vision.get("flavor", "custom"),
        "model.output_head": model.get("output_head", "lm"),
        "model.tie_word_embeddings": bool(model.get("tie_word_embeddings", False)),
    }


def optimizer_transfer_problem(saved: dict, config: dict) -> str | None:
    """Why a saved run's optimizer state cannot seed `config` (None when it can)."""
    ours, theirs = _trainable_signature(config), _trainable_signature(saved)
    changed = [f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
    if not changed:
        return None
    return ("the saved run trained another parameter set (" + "; ".join(changed) + "), so its "
            "Adam state does not fit this run's optimizer; use checkpoint.load_state=weights")


def check_optimizer_transfer(load: str, config: TrainConfig) -> None:
    """Refuse `checkpoint.load_state=weights+optimizer` across a change of trainable set."""
    from megatron_keye.config import config_to_dict

    saved = saved_run_config(load)
    if saved is None:
        return  # a converted checkpoint: it has no optimizer state and loads as weights
    problem = optimizer_transfer_problem(saved, config_to_dict(config))
    if problem:
        raise ConfigError("checkpoint.load_state", f"{load}: {problem}")


# ------------------------------------------------------------------------------ arguments
_FLAGS = {"--nproc": "nproc", "--nnodes": "nnodes", "--nproc-per-node": "nproc_per_node",
          "--node-rank": "node_rank", "--rdzv-endpoint": "rdzv_endpoint",
          "--rdzv-id": "rdzv_id", "--run-dir": "run_dir"}
_INT_FLAGS = {"nproc", "nnodes", "nproc_per_node", "node_rank"}
_MODES = {"--status": "status", "--progress": "progress", "--dry-run": "dry-run"}


def parse_pipeline_args(argv: list[str]) -> tuple[list[str], PipelineOptions, list[str],
                                                   dict[str, list[str]]]:
    """Split argv into recipes, options, overrides for all stages and per-stage overrides."""
    recipes: list[str] = []
    options = PipelineOptions()
    common: list[str] = []
    per_stage: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if arg in _MODES:
            options.mode = _MODES[arg]
        elif key in _FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(key, "needs a value")
                value, i = argv[i + 1], i + 1
            attr = _FLAGS[key]
            if attr in _INT_FLAGS:
                try:
                    setattr(options, attr, int(value))
                except ValueError:
                    raise ConfigError(key, f"expected an integer, got {value!r}") from None
            else:
                setattr(options, attr, value)
        elif arg.startswith("--") and ":" in key and "." in key.split(":", 1)[1]:
            selector, override = arg[2:].split(":", 1)
            if "=" not in override:
                raise ConfigError(arg, "a stage override looks like --K:section.field=value")
            per_stage.setdefault(selector, []).append(override)
        elif arg.startswith("--") and "." in key:
            if not eq:
                raise ConfigError(arg, "an override looks like --section.field=value")
            common.append(arg[2:])
        elif arg.startswith("-"):
            raise ConfigError(arg, "unknown option (megatron-keye pipeline --help lists them)")
        else:
            recipes.append(arg)
        i += 1
    if not recipes:
        raise ConfigError("pipeline", "name at least one recipe")
    if options.rdzv_endpoint and not options.nproc_per_node:
        raise ConfigError("--nproc-per-node", "required with --rdzv-endpoint (multi-node)")
    return recipes, options, common, per_stage


# ------------------------------------------------------------------------------ resolution
def _stage_world_size(config: TrainConfig, options: PipelineOptions, where: str) -> int:
    if options.nproc_per_node:
        return options.nnodes * options.nproc_per_node
    if options.nproc:
        return options.nproc
    p = config.parallel
    if p.data <= 0:
        raise ConfigError(f"{where}: parallel.data",
                          "is 0 (derived from the world size); set it, or pass --nproc")
    return p.tensor * p.pipeline * p.context * p.data


def resolve_stages(recipes: list[str], options: PipelineOptions, common: list[str],
                   per_stage: dict[str, list[str]]) -> list[Stage]:
    """Every stage's config with its overrides (and the --run-dir rewrites), checked up front
    (layouts only when stages will run: --status and --progress need no world size)."""
    stages: list[Stage] = []
    used = set()
    recipe_save_dirs: list[str | None] = []
    for index, recipe in enumerate(recipes, start=1):
        recipe_path(recipe)  # a clear error for an unknown recipe
        base = load_config(recipe, common)
        own = [*per_stage.get(str(index), []), *per_stage.get(base.stage.name, [])]
        used.update(k for k in per_stage if k in (str(index), base.stage.name))
        overrides = [*common, *own]
        config = load_config(recipe, overrides)
        recipe_save_dirs.append(config.checkpoint.save_dir)
        if options.run_dir:
            stage_dir = Path(options.run_dir) / f"{index}-{config.stage.name}"
            extra = [f"checkpoint.save_dir={stage_dir / 'checkpoints'}",
                     f"logging.output_dir={stage_dir}"]
            if index > 1 and config.checkpoint.load in (None, recipe_save_dirs[-2]):
                extra.append(f"checkpoint.load={stages[-1].save_dir}")
            overrides += extra
            config = load_config(recipe, overrides)
        stages.append(Stage(index=index, recipe=recipe, overrides=overrides, config=config))
    unknown = sorted(set(per_stage) - used)
    if unknown:
        names = [f"{s.index} ({s.name})" for s in stages]
        raise ConfigError(f"--{unknown[0]}:", f"no such stage; stages are {names}")
    check_stages(stages, options, layouts=options.mode in ("run", "dry-run"))
    return stages


def check_stages(stages: list[Stage], options: PipelineOptions, *, layouts: bool = True) -> None:
    """Refuse a pipeline that cannot run to the end, before its first stage starts."""
    seen: dict[str, Stage] = {}
    for stage in stages:
        where = stage.label
        if layouts:
            try:
                validate(stage.config, _stage_world_size(stage.config, options, where))
            except ConfigError as err:
                field = err.field if err.field.startswith(where) else f"{where}: {err.field}"
                raise ConfigError(field, str(err)[len(err.field) + 2:]) from None
        if not stage.save_dir:
            raise ConfigError(f"{where}: checkpoint.save_dir",
                              "required: a pipeline knows a stage is finished by its checkpoint")
        key = str(Path(stage.save_dir).resolve())
        if key in seen:
            raise ConfigError(f"{where}: checkpoint.save_dir",
                              f"{stage.save_dir} is also {seen[key].label}'s; each stage needs "
                              f"its own (a shared one would resume the other stage)")
        load = stage.config.checkpoint.load
        writer = seen.get(str(Path(load).resolve())) if load else None
        if load and writer is None and not Path(load).exists():
            raise ConfigError(f"{where}: checkpoint.load",
                              f"{load} does not exist and no earlier stage writes it")
        scope = stage.config.checkpoint.load_state
        if writer is not None and scope == "resume" and not stage.config.checkpoint.load_weights_only:
            raise ConfigError(f"{where}: checkpoint.load_state",
                              f"resume would continue {writer.label}'s iteration, LR schedule and "
                              f"data position; a new stage starts with weights+optimizer or "
                              f"weights")
        if load and scope == "weights+optimizer" and not stage.config.checkpoint.load_weights_only:
            from megatron_keye.config import config_to_dict

            saved = (config_to_dict(writer.config) if writer is not None
                     else saved_run_config(load))
            problem = saved and optimizer_transfer_problem(saved, config_to_dict(stage.config))
            if problem:
                raise ConfigError(f"{where}: checkpoint.load_state", problem)
        seen[key] = stage


# ------------------------------------------------------------------------------- launching
def stage_command(stage: Stage, options: PipelineOptions) -> list[str]:
    """The torchrun command line that trains one stage (on this node)."""
    run = [sys.executable, "-m", "torch.distributed.run",
           f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    if options.rdzv_endpoint:
        host, _, port = options.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("--rdzv-endpoint", f"expected HOST:PORT, got {options.rdzv_endpoint!r}")
        run += [f"--nnodes={options.nnodes}", f"--nproc-per-node={options.nproc_per_node}",
                f"--node-rank={options.node_rank}", "--rdzv-backend=c10d",
                # a fresh store per stage: the previous stage's may still hold its port
                f"--rdzv-endpoint={host}:{int(port) + stage.index - 1}",
                f"--rdzv-id={options.rdzv_id}-stage{stage.index}",
                f"--rdzv-conf=is_host={'true' if options.node_rank == 0 else 'false'}"]
    else:
        world = _stage_world_size(stage.config, options, stage.label)
        run += ["--standalone", f"--nproc-per-node={world}"]
    return [*run, "-m", "megatron_keye.train", *stage.train_args()]


def describe(stage: Stage) -> str:
    """One status line: progress, layout, sequence length and what it loads."""
    done = stage.iteration()
    state = ("finished" if done is not None and done >= stage.train_iters else
             f"at iteration {done} of {stage.train_iters}" if done is not None else "not started")
    p, c = stage.config.parallel, stage.config
    layout = f"TP{p.tensor} PP{p.pipeline} CP{p.context} DP{p.data or 'auto'}"
    load = c.checkpoint.load
    start = (f"from {load} ({'weights' if c.checkpoint.load_weights_only else c.checkpoint.load_state})"
             if load else "from scratch")
    return (f"{stage.label}: {state} | {layout} | seq {c.data.seq_length} rope_base "
            f"{c.model.rope_base:g} | {start} | save_dir {stage.save_dir}")


class _Forwarder:
    """Passes stop signals on to the running stage's torchrun (which passes them to ranks)."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in FORWARDED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame):
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def run_stages(stages: list[Stage], options: PipelineOptions) -> int:
    """Train every unfinished stage in order; 0 when all are finished or a stop signal ended
    the current one cleanly (run again to continue), else the failing stage's exit status."""
    with _Forwarder() as forwarder:
        for stage in stages:
            if stage.finished():
                print(f"[pipeline] {stage.label}: finished (iteration {stage.iteration()}); "
                      f"skipping", flush=True)
                continue
            before = stage.iteration()
            print(f"[pipeline] {describe(stage)}", flush=True)
            command = stage_command(stage, options)
            local = options.nproc_per_node or _stage_world_size(stage.config, options,
                                                                stage.label)
            threads = str(max(1, (os.cpu_count() or 1) // local))
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            forwarder.child = subprocess.Popen(command, env=env)
            status = forwarder.child.wait()
            forwarder.child = None
            reached = stage.iteration()
            if reached is not None and reached >= stage.train_iters:
                print(f"[pipeline] {stage.label}: finished at iteration {reached}", flush=True)
                if forwarder.received is None:
                    continue
            if forwarder.received is not None:
                name = signal.Signals(forwarder.received).name
                print(f"[pipeline] {name}: stopped in {stage.label} at iteration {reached} of "
                      f"{stage.train_iters}; run the same command again to continue",
                      flush=True)
                return 0
            if status != 0:
                print(f"[pipeline] {stage.label} failed (exit status {status}) at iteration "
                      f"{reached} (started at {before}); later stages did not run",
                      file=sys.stderr, flush=True)
                return status
            print(f"[pipeline] {stage.label} stopped at iteration {reached} of "
                  f"{stage.train_iters} (schedule.exit_at_iteration?); later stages wait for "
                  f"it: run the same command again", flush=True)
            return 0
    return 0


def cli_main(argv: list[str]) -> int:
    """`megatron-keye pipeline ...`."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    recipes, options, common, per_stage = parse_pipeline_args(argv)
    stages = resolve_stages(recipes, options, common, per_stage)
    if options.mode == "progress":
        print(sum(s.iteration() or 0 for s in stages))
        return 0 if all(s.finished() for s in stages) else NOT_FINISHED
    if options.mode in ("status", "dry-run"):
        for stage in stages:
            print(describe(stage))
            if options.mode == "dry-run" and not stage.finished():
                print("  " + " ".join(stage_command(stage, options)))
        if options.mode == "dry-run":
            return 0
        return 0 if all(s.finished() for s in stages) else NOT_FINISHED
    return run_stages(stages, options)


__all__ = [
    "PipelineOptions",
    "Stage",
    "check_optimizer_transfer",
    "checkpoint_iteration",
    "cli_main",
    "optimizer_transfer_problem",
    "parse_pipeline_args",
    "resolve_stages",
    "run_stages",
    "saved_run_config",
    "stage_command",
]
