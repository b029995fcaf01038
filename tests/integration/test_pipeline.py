"""`megatron-keye pipeline` over two tiny text stages, as a user (or a requeued job) runs it.

Stage 1 trains at DP=2 on 64-token rows; stage 2 starts from stage 1's checkpoint at PP=2 on
128-token rows with RoPE base 8e6, keeping the Adam state (load_state=weights+optimizer) but not
the LR schedule or stage 1's learning rates. The same command then skips both finished stages; and a second run directory,
whose stage 1 is already done, is killed (SIGKILL, every process) in the middle of stage 2 and
restarted with the same command: it resumes from stage 2's latest checkpoint and ends with the
uninterrupted run's final loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from megatron_keye.stages import checkpoint_iteration

STAGES = ["tiny-cpu-text", "tiny-cpu-text"]
OVERRIDES = [
    "--schedule.train_iters=6", "--schedule.warmup_iters=1", "--schedule.global_batch_size=8",
    "--schedule.micro_batch_size=2", "--data.num_documents=300", "--logging.log_interval=1",
    "--logging.wandb_mode=disabled", "--checkpoint.save_interval=2", "--parallel.tensor=1",
    "--parallel.sequence_parallel=false",
    "--1:stage.name=short", "--1:parallel.pipeline=1", "--1:parallel.data=2",
    "--1:data.seq_length=64",
    "--2:stage.name=long", "--2:parallel.pipeline=2", "--2:parallel.data=1",
    "--2:data.seq_length=128", "--2:model.rope_base=8e6",
    "--2:checkpoint.load_state=weights+optimizer", "--2:optimizer.lr=1e-3",
    "--2:optimizer.min_lr=1e-4",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_keye.cli", "pipeline", *STAGES,
            f"--run-dir={run_dir}", *OVERRIDES]


def _pipeline(run_dir: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(run_dir), env=ENV, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _metrics(stage_dir: Path) -> dict[int, dict]:
    """step -> metrics (a step re-run after a resume keeps its last record)."""
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def _kill_tree(process: subprocess.Popen) -> None:
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    psutil.wait_procs(family, timeout=60)


def test_pipeline_stages_transition_skip_and_resume_after_a_kill(tmp_path):
    run_a = tmp_path / "a"
    first = _pipeline(run_a)
    short, long = run_a / "1-short", run_a / "2-long"
    assert checkpoint_iteration(short / "checkpoints") == 6
    assert checkpoint_iteration(long / "checkpoints") == 6

    # Stage 2 loaded stage 1 into another layout, with its own length and RoPE base.
    saved = yaml.safe_load((long / "checkpoints" / "iter_0000006" / "config.yaml").read_text())
    assert saved["checkpoint"]["load"] == str(short / "checkpoints")
    assert saved["checkpoint"]["load_state"] == "weights+optimizer"
    assert saved["data"]["seq_length"] == 128 and saved["model"]["rope_base"] == 8e6
    assert saved["parallel"]["pipeline"] == 2
    assert "starting from checkpoint.load (weights+optimizer)" in first.stderr
    assert "LR schedule, iteration and data order start fresh" in first.stderr
    m1, m2 = _metrics(short), _metrics(long)
    assert sorted(m1) == sorted(m2) == [1, 2, 3, 4, 5, 6]
    # Stage 2's own schedule from step 0 (peak 1e-3; stage 1's peak was 3e-3), not stage 1's
    # position or the rates and limits stored in stage 1's optimizer state.
    assert math.isclose(m2[1]["lr"], m1[1]["lr"] / 3, rel_tol=1e-6)
    assert math.isclose(max(m["lr"] for m in m2.values()), 1e-3, rel_tol=1e-6)
    assert min(m["lr"] for m in m2.values()) >= 1e-4
    # The trained weights carried over: stage 2 starts far below a fresh model's loss.
    assert m2[1]["loss"] < m1[1]["loss"] - 0.3
    assert all(math.isfinite(m["loss"]) for m in (*m1.values(), *m2.values()))

    # The same command again: both stages are finished and skipped, nothing trains.
    again = _pipeline(run_a)
    assert again.stdout.count("finished (iteration 6); skipping") == 2
    assert "megatron_keye.train" not in again.stderr
    assert sorted(_metrics(long)) == [1, 2, 3, 4, 5, 6]

    # Another run whose stage 1 is done: kill everything in the middle of stage 2.
    run_b = tmp_path / "b"
    shutil.copytree(short, run_b / "1-short")
    killed = subprocess.Popen(_command(run_b), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    latest = run_b / "2-long" / "checkpoints"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed.poll() is None:
            if (checkpoint_iteration(latest) or 0) >= 2:
                break
            time.sleep(0.05)
    finally:
        _kill_tree(killed)
    stopped = checkpoint_iteration(latest)
    assert stopped is not None and 2 <= stopped < 6, f"stage 2 was not interrupted: {stopped}"

    resumed = _pipeline(run_b)
    assert "stage 1 (short, tiny-cpu-text): finished (iteration 6); skipping" in resumed.stdout
    assert "resuming this run from its save_dir" in resumed.stderr
    assert f"at iteration {stopped} of 6" in resumed.stdout
    assert checkpoint_iteration(latest) == 6
    final_a, final_b = m2[6]["loss"], _metrics(run_b / "2-long")[6]["loss"]
    assert abs(final_b - final_a) <= 1e-5 * abs(final_a), (final_a, final_b)
