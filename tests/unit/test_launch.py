"""The slurm scripts, `megatron-keye launch --dry-run`, and the pipeline's stage resolution."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from megatron_keye import launch
from megatron_keye.cli import COMMANDS
from megatron_keye.config import ConfigError, load_config, validate
from megatron_keye.stages import (
    PipelineOptions,
    check_optimizer_transfer,
    checkpoint_iteration,
    optimizer_transfer_problem,
    parse_pipeline_args,
    resolve_stages,
    stage_command,
)

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh"))

# Set by sbatch/srun for the job, its steps and array tasks.
SLURM_VARIABLES = {"SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST",
                   "SLURM_NODELIST", "SLURM_SUBMIT_DIR", "SLURM_GPUS_PER_NODE",
                   "SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_ARRAY_TASK_ID"}


# ------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _code(text: str) -> str:
    """A script without its comment lines."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _unknown_variables(text: str, common: str) -> set[str]:
    """Variables a script reads that neither it, common.sh, nor slurm sets (and no default)."""
    code = _code(text + "\n" + common)
    assigned = set(re.findall(r"(?:^|[\s;(])(?:export\s+|local\s+)?([A-Za-z_]\w*)=", code, re.M))
    assigned |= {name for pair in re.findall(r"\blocal\s+(\w+)\s*(\w*)", code) for name in pair}
    assigned |= set(re.findall(r"\bfor\s*\(\(\s*(\w+)", code))
    defaulted = set(re.findall(r"\$\{([A-Za-z_]\w*):?[-?=]", code))
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", _code(text)))
    return used - assigned - defaulted - SLURM_VARIABLES - {"PATH"}


def test_scripts_use_only_variables_they_set_slurm_sets_or_default():
    common = (SLURM_DIR / "common.sh").read_text()
    for script in SCRIPTS:
        unknown = _unknown_variables(script.read_text(), common)
        assert not unknown, f"{script.name} uses {sorted(unknown)} that nothing sets"
    # the check itself finds a variable nothing sets
    assert _unknown_variables('echo "$KEYE_HEAD $SLURM_NTASKS_TYPO"', common) == {
        "SLURM_NTASKS_TYPO"}


def test_scripts_call_real_entry_points_and_slurm_settings():
    for script in SCRIPTS:
        text = _code(script.read_text())
        for command in re.findall(r"-m megatron_keye\.cli (\w+)", text):
            assert command in COMMANDS, f"{script.name}: megatron-keye {command} does not exist"
        assert "-m megatron_keye.train" not in text or script.name in (
            "train.sbatch", "train_single_node.sbatch")
    for name in ("train.sbatch", "train_single_node.sbatch", "pipeline.sbatch"):
        text = (SLURM_DIR / name).read_text()
        assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
        assert "keye_finish_or_requeue" in text and "srun --kill-on-bad-exit=1" in text
    node = (SLURM_DIR / "torchrun_node.sh").read_text()
    for flag in ("--rdzv-backend=c10d", '--rdzv-endpoint="${KEYE_HEAD:?}:${KEYE_PORT:?}"',
                 '--node-rank="$SLURM_NODEID"', "SIGUSR1", "--shutdown-timeout=110"):
        assert flag in node
    multi = (SLURM_DIR / "train.sbatch").read_text()
    assert 'srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash "$KEYE_SLURM_DIR/torchrun_node.sh"' in multi
    assert "launch --dry-run" in multi
    common = (SLURM_DIR / "common.sh").read_text()
    for setting in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                    "NCCL_IB_TIMEOUT", "scontrol show hostnames", "scontrol requeue"):
        assert setting in common
    assert "SLURM_ARRAY_TASK_ID" in (SLURM_DIR / "preprocess.sbatch").read_text()


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "LOG": str(tmp_path / "log")}


@pytest.mark.parametrize("progress,status,expect_rc,requeued", [
    ("12", 0, 0, False),   # every stage finished
    ("12", 3, 0, True),    # stopped after progress (time limit, preemption): requeue
    ("5", 3, 1, False),    # no progress in this job (a crash): fail, no requeue loop
    ("", 2, 2, False),     # the progress cannot be read: fail
])
def test_finish_or_requeue(tmp_path, progress, status, expect_rc, requeued):
    env = _fake_bin(tmp_path, {
        "fakepython": f'echo "$*" >> "$LOG"; echo {progress}; exit {status}\n',
        "scontrol": 'echo "scontrol $*" >> "$LOG"\n',
    })
    script = (f'set -euo pipefail; KEYE_PYTHON=fakepython; source "{SLURM_DIR}/common.sh"; '
              f'SLURM_JOB_ID=77; keye_finish_or_requeue 5 keye8b-stage1 --x.y=1')
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == expect_rc, done.stdout + done.stderr
    log = (tmp_path / "log").read_text()
    assert "-m megatron_keye.cli pipeline --progress keye8b-stage1 --x.y=1" in log
    assert ("scontrol requeue 77" in log) == requeued


def test_preprocess_array_task_picks_its_line(tmp_path):
    env = _fake_bin(tmp_path, {"srun": 'echo "$*" >> "$LOG"\n'})
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("caption=/data/a.jsonl\n/data/b.jsonl\n")
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_CPUS_PER_TASK="4", SLURM_SUBMIT_DIR=str(REPO),
               KEYE_PYTHON="python3")
    done = subprocess.run(["bash", str(SLURM_DIR / "preprocess.sbatch"), str(inputs), "/out",
                           "--max-tokens", "9000"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "log").read_text().strip() == (
        "python3 -m megatron_keye.cli preprocess --input /data/b.jsonl --output-dir /out "
        "--name part-00001 --workers 3 --no-progress --max-tokens 9000")
    env["SLURM_ARRAY_TASK_ID"] = "2"
    beyond = subprocess.run(["bash", str(SLURM_DIR / "preprocess.sbatch"), str(inputs), "/out"],
                            env=env, capture_output=True, text=True)
    assert beyond.returncode == 2 and "has no line 3" in beyond.stderr


# ------------------------------------------------------------------------------- dry run
def _launch(argv, capsys) -> tuple[int, str]:
    rc = launch.cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("recipe,extra", [("keye8b-stage1", []), ("keye8b-stage2", []),
                                          ("keye8b-stage3", [])])
def test_dry_run_accepts_the_8b_stage_recipes_on_64_gpus(recipe, extra, capsys):
    rc, out = _launch(["--dry-run", "--recipe", recipe, "--nodes", "8", "--gpus-per-node", "8",
                       "--gpu-memory", "80", *extra], capsys)
    assert rc == 0, out
    total = float(re.search(r"total\s+([\d.]+) GiB of 76.0 usable", out).group(1))
    assert 10 < total < 76
    assert "feasible" in out and "MFU" in out
    assert f"would submit: sbatch --nodes=8 --gpus-per-node=8 examples/slurm/train.sbatch {recipe}" in out


def test_dry_run_counts_frozen_parameters_and_the_vision_tower(capsys):
    rc, out = _launch(["--dry-run", "--json", "--recipe", "keye8b-stage1", "--recipe",
                       "keye8b-stage2", "--nodes", "8", "--gpus-per-node", "8"], capsys)
    assert rc == 0
    stage1, stage2 = json.loads(out[out.index("["):out.rindex("]") + 1])
    # Stage 1 trains the projector only: no language-model gradients or Adam state.
    assert stage1["memory_gib"]["grads"] == 0 and stage1["memory_gib"]["optimizer"] == 0
    # ZeRO-2: 8.2B gradients sharded over 64 data-parallel ranks (ZeRO-1 would hold ~30 GiB)
    assert 0 < stage2["memory_gib"]["grads"] < 1
    assert 0 < stage1["vision_gib"] < stage2["vision_gib"]
    tower, projector = launch.vision_parameter_counts(
        load_config("keye8b-stage1").model.vision, 4096)
    assert 0.39e9 < tower < 0.43e9 and 35e6 < projector < 45e6  # SigLIP-so400m, mlp_AR


def test_dry_run_counts_the_vision_towers_activations_of_128k_rows(capsys):
    """Stage 3 without the tower's recompute: two maximal 65,536-token videos fill a 128K row;
    each is encoded whole on one CP rank, which does not fit; the refusal names the vision
    tower (the recipe recomputes the tower, which fits)."""
    rc, out = _launch(["--dry-run", "--recipe", "keye8b-stage3", "--nodes", "8",
                       "--gpus-per-node", "8", "--model.vision.recompute=none"], capsys)
    assert rc == 2
    assert re.search(r"vision tower \+ projector: [\d.]+ GiB at 131,072 visual tokens per row; "
                     r"--visual-tokens-per-row sets the count", out), out
    vision = [float(re.search(r"vision tower \+ projector\s+([\d.]+) GiB", o).group(1))
              for o in (_launch(["--dry-run", "--recipe", "keye8b-stage3", "--nodes", "8",
                                 "--gpus-per-node", "8", f"--visual-tokens-per-row={n}"],
                                capsys)[1] for n in (4096, 8192))]
    assert 0 < vision[0] < vision[1] < 2 * vision[0]  # weights + activations linear in patches


def test_dry_run_refuses_128k_on_8_gpus_with_the_reason(capsys):
    rc, out = _launch(["--dry-run", "--recipe", "keye8b-stage3", "--nodes", "1",
                       "--gpus-per-node", "8"], capsys)
    assert rc == 2 and "would submit" not in out
    assert "refused for 1 x 8 GPUs: parallel: world size 8 != tensor(2) x pipeline(2) x " \
           "context(16) x data(1)" in out
    assert "needs 64 GPUs" in out
    # the same 128K recipe squeezed onto 8 GPUs: a valid layout that does not fit in memory
    rc, out = _launch(["--dry-run", "--recipe", "keye8b-stage3", "--nodes", "1",
                       "--gpus-per-node", "8", "--parallel.tensor=1", "--parallel.context=4",
                       "--parallel.data=1"], capsys)
    assert rc == 2
    assert re.search(r"refused: needs [\d.]+ GiB per GPU > 76.0 GiB usable", out), out
    # and with a bigger allocation the planner's advice (more CP) makes it fit
    rc, out = _launch(["--dry-run", "--recipe", "keye8b-stage3", "--nodes", "2",
                       "--gpus-per-node", "8", "--parallel.tensor=2", "--parallel.context=4",
                       "--parallel.data=1", "--model.recompute=full",
                       "--visual-tokens-per-row=4096"], capsys)
    assert rc == 0, out


def test_launch_prints_the_pipeline_sbatch_for_several_recipes(capsys):
    rc, out = _launch(["--recipe", "keye8b-stage1", "--recipe", "keye8b-stage2", "--nodes", "8",
                       "--optimizer.lr=1e-4"], capsys)
    assert rc == 0
    assert out.strip().splitlines()[-1] == (
        "sbatch --nodes=8 --gpus-per-node=8 examples/slurm/pipeline.sbatch keye8b-stage1 "
        "keye8b-stage2 --optimizer.lr=1e-4")


# --------------------------------------------------------------------- recipes and stages
@pytest.mark.parametrize("recipe,world", [("tiny-cpu-stage1", 2), ("tiny-cpu-stage2", 2),
                                          ("tiny-cpu-stage3", 4), ("keye8b-stage1", 64),
                                          ("keye8b-stage2", 64), ("keye8b-stage3", 64)])
def test_stage_recipes_validate_at_their_world_size(recipe, world):
    config = load_config(recipe)
    validate(config, world)
    assert config.model.vision is not None and config.checkpoint.load
    assert config.data.kind == "shards"


def test_stage_recipes_follow_the_paper():
    s1, s2, s3 = (load_config(f"keye8b-stage{i}") for i in (1, 2, 3))
    t2, t3 = load_config("tiny-cpu-stage2"), load_config("tiny-cpu-stage3")
    assert set(s1.stage.freeze) == {"vision.*", "embedding.*", "decoder.*", "output_layer.*"}
    assert not s2.stage.freeze and not s3.stage.freeze
    assert s1.data.seq_length == s2.data.seq_length == 8192 and s3.data.seq_length == 131072
    assert s3.model.rope_base == 8e6 and s2.model.rope_base == 1e6
    assert {s.name: s.weight for s in s3.data.sources} == {"video": 24, "image": 50, "text": 26}
    p3 = s3.parallel
    assert p3.context > 1 and p3.pipeline > 1 and p3.distributed_optimizer
    assert s2.checkpoint.load == s1.checkpoint.save_dir and s2.checkpoint.load_state == "weights"
    assert s3.checkpoint.load == s2.checkpoint.save_dir
    # stages 1 and 2 run the paper's ZeRO-2; stage 3 (ZeRO-1 + CP + PP) takes their weights
    assert s1.parallel.zero_stage == s2.parallel.zero_stage == 2 and p3.zero_stage == 1
    assert s3.checkpoint.load_state == "weights"
    assert t3.data.seq_length == 4 * t2.data.seq_length and t3.model.rope_base == 8e6
    assert (t3.parallel.context, t3.parallel.pipeline) == (2, 2)


def test_parse_pipeline_args():
    recipes, options, common, per_stage = parse_pipeline_args(
        ["a", "b", "--nproc", "4", "--run-dir=/r", "--x.y=1", "--2:data.seq_length=512",
         "--long:model.rope_base=8e6", "--status"])
    assert recipes == ["a", "b"] and options.nproc == 4 and options.run_dir == "/r"
    assert options.mode == "status" and common == ["x.y=1"]
    assert per_stage == {"2": ["data.seq_length=512"], "long": ["model.rope_base=8e6"]}
    with pytest.raises(ConfigError, match="--nproc: expected an integer"):
        parse_pipeline_args(["a", "--nproc", "four"])
    with pytest.raises(ConfigError, match="unknown option"):
        parse_pipeline_args(["a", "--bogus"])
    with pytest.raises(ConfigError, match="at least one recipe"):
        parse_pipeline_args(["--nproc=2"])
    with pytest.raises(ConfigError, match="--nproc-per-node: required"):
        parse_pipeline_args(["a", "--rdzv-endpoint", "h:1"])


def _stages(argv):
    return resolve_stages(*parse_pipeline_args(argv))


def test_run_dir_chains_each_stage_to_the_previous_one(tmp_path):
    stages = _stages(["tiny-cpu-stage1", "tiny-cpu-stage2", "tiny-cpu-stage3",
                      f"--run-dir={tmp_path}", "--1:checkpoint.load=null", "--dry-run"])
    dirs = [tmp_path / f"{i}-{n}" for i, n in
            ((1, "stage1-alignment"), (2, "stage2-multitask"), (3, "stage3-annealing"))]
    assert [s.save_dir for s in stages] == [str(d / "checkpoints") for d in dirs]
    assert [s.config.checkpoint.load for s in stages] == [
        None, str(dirs[0] / "checkpoints"), str(dirs[1] / "checkpoints")]
    assert [s.config.logging.output_dir for s in stages] == [str(d) for d in dirs]
    command = stage_command(stages[2], PipelineOptions())
    assert "--standalone" in command and "--nproc-per-node=4" in command
    assert command[command.index("-m", 3):][:2] == ["-m", "megatron_keye.train"]
    assert f"--checkpoint.load={dirs[1] / 'checkpoints'}" in command
    multi = stage_command(stages[1], PipelineOptions(nnodes=2, nproc_per_node=1, node_rank=1,
                                                     rdzv_endpoint="head:29500", rdzv_id="j"))
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=head:29501", "--rdzv-id=j-stage2",
            "--node-rank=1", "--rdzv-conf=is_host=false", "--nnodes=2"} <= set(multi)


def test_pipeline_refuses_what_cannot_run_before_starting(tmp_path):
    base = ["tiny-cpu-stage1", "tiny-cpu-stage2", f"--run-dir={tmp_path}", "--dry-run"]
    with pytest.raises(ConfigError, match=r"stage 1 .*checkpoint.load: outputs/demo/init does "
                                          r"not exist and no earlier stage writes it"):
        _stages(base)
    # stage 1 trained the projector only: its Adam state cannot seed a full-model optimizer
    with pytest.raises(ConfigError, match=r"stage 2 .*checkpoint.load_state: .*stage.freeze"):
        _stages([*base, "--1:checkpoint.load=null", "--2:checkpoint.load_state=weights+optimizer"])
    with pytest.raises(ConfigError, match=r"stage 2 .*load_state: resume would continue stage 1"):
        _stages([*base, "--1:checkpoint.load=null", "--2:checkpoint.load_state=resume"])
    with pytest.raises(ConfigError, match=r"stage 2 .*save_dir: .* is also stage 1"):
        _stages(["tiny-cpu-stage1", "tiny-cpu-stage2", "--checkpoint.save_dir=/tmp/same",
                 "--1:checkpoint.load=null", "--dry-run"])
    with pytest.raises(ConfigError, match=r"stage 2 .*schedule.global_batch_size"):
        _stages([*base, "--1:checkpoint.load=null", "--2:parallel.data=3"])
    with pytest.raises(ConfigError, match=r"no such stage"):
        _stages([*base, "--1:checkpoint.load=null", "--7:data.seq_length=64"])
    with pytest.raises(ConfigError, match=r"parallel.data: is 0"):
        _stages(["tiny-cpu-text", "--dry-run", f"--checkpoint.save_dir={tmp_path}"])


def test_load_state_contradicting_load_weights_only_is_refused():
    config = load_config("tiny-cpu-text", ["checkpoint.load_weights_only=true",
                                           "checkpoint.load_state=weights+optimizer"])
    with pytest.raises(ConfigError, match="checkpoint.load_state: weights\\+optimizer contradicts"):
        validate(config, 4)


def test_optimizer_transfer_needs_the_same_trainable_set(tmp_path):
    stage1 = yaml.safe_load(yaml.safe_dump(
        __import__("megatron_keye.config", fromlist=["config_to_dict"]).config_to_dict(
            load_config("tiny-cpu-stage1"))))
    stage2 = load_config("tiny-cpu-stage2", ["checkpoint.load_state=weights+optimizer"])
    assert "stage.freeze" in optimizer_transfer_problem(stage1, stage1 | {"stage": {}})
    assert optimizer_transfer_problem(stage1, stage1) is None
    save_dir = tmp_path / "ckpt"
    (save_dir / "iter_0000008").mkdir(parents=True)
    (save_dir / "iter_0000008" / "metadata.json").write_text("{}")
    (save_dir / "iter_0000008" / "config.yaml").write_text(yaml.safe_dump(stage1))
    (save_dir / "latest").write_text("iter_0000008\n")
    assert checkpoint_iteration(save_dir) == 8
    with pytest.raises(ConfigError, match="checkpoint.load_state: .*use checkpoint.load_state=weights"):
        check_optimizer_transfer(str(save_dir), stage2)
    check_optimizer_transfer(str(save_dir), load_config("tiny-cpu-stage1"))  # same set: fine


def test_checkpoint_iteration(tmp_path):
    assert checkpoint_iteration(tmp_path) is None and checkpoint_iteration(None) is None
    (tmp_path / "latest").write_text("iter_0000012\n")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint_iteration(tmp_path)
    (tmp_path / ".old_iter_0000012").mkdir()  # a re-save interrupted: the old copy counts
    (tmp_path / ".old_iter_0000012" / "metadata.json").write_text("{}")
    assert checkpoint_iteration(tmp_path) == 12


def test_rendezvous_head_is_the_first_node_of_a_long_list(tmp_path):
    env = _fake_bin(tmp_path, {
        "scontrol": 'echo "$*" > "$LOG"; for i in $(seq -w 1 5000); do echo "gpu$i"; done\n'})
    env["SLURM_JOB_NODELIST"] = "gpu[0001-5000]"
    done = subprocess.run(["bash", "-c", f'set -euo pipefail; source "{SLURM_DIR}/common.sh"; '
                           'keye_rendezvous; echo "$KEYE_HEAD:$KEYE_PORT"'],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "gpu0001:29500"
    assert (tmp_path / "log").read_text().strip() == "show hostnames gpu[0001-5000]"


FAKE_STAGE = r"""
import os, signal, sys, time
from pathlib import Path
save_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
def stop(signum, frame):  # what the trainer does: save at the step boundary, exit 0
    (save_dir / "iter_0000003").mkdir(parents=True)
    (save_dir / "iter_0000003" / "metadata.json").write_text("{}")
    (save_dir / "latest").write_text("iter_0000003\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
ready.write_text(str(os.getpid()))
time.sleep(60)
sys.exit(5)
"""


def test_pipeline_forwards_a_stop_signal_and_does_not_start_the_next_stage(tmp_path, monkeypatch,
                                                                          capsys):
    from megatron_keye import stages as stages_module

    ready = tmp_path / "ready"
    launched = []

    def fake_command(stage, options):
        launched.append(stage.index)
        return [sys.executable, "-c", FAKE_STAGE, stage.save_dir, str(ready)]

    monkeypatch.setattr(stages_module, "stage_command", fake_command)
    recipes, options, common, per_stage = parse_pipeline_args(
        ["tiny-cpu-text", "tiny-cpu-text", f"--run-dir={tmp_path / 'run'}", "--nproc=1",
         "--parallel.tensor=1", "--parallel.pipeline=1", "--parallel.sequence_parallel=false",
         "--schedule.train_iters=10", "--schedule.warmup_iters=1", "--2:stage.name=second",
         "--2:checkpoint.load_state=weights"])
    stages = resolve_stages(recipes, options, common, per_stage)

    def signal_when_ready():
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # slurm/the user signals the pipeline process

    sender = threading.Thread(target=signal_when_ready)
    sender.start()
    rc = stages_module.run_stages(stages, options)
    sender.join()
    out = capsys.readouterr().out
    assert rc == 0 and launched == [1]
    assert "SIGTERM: stopped in stage 1 (pretrain, tiny-cpu-text) at iteration 3 of 10" in out
    assert checkpoint_iteration(stages[0].save_dir) == 3
