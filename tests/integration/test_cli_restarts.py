"""Restarts as slurm causes them: a signal before the time limit, and a requeued fine-tuning job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.integration.test_cli_layouts import COMMON, megatron_keye, metrics


def test_sigusr1_to_one_rank_saves_and_exits_zero_then_requeue_resumes(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = ["train", "--nproc", "2", *COMMON, "--parallel.tensor=1", "--parallel.pipeline=1",
            "--schedule.train_iters=100000", f"--logging.output_dir={run_dir}",
            f"--checkpoint.save_dir={ckpt}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = subprocess.Popen([sys.executable, "-m", "megatron_keye.cli", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and launcher.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3:
                break
            time.sleep(0.5)
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "megatron_keye.train" in " ".join(p.cmdline())
                   and "torch.distributed.run" not in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        # slurm signals every task; one rank alone must still stop the whole job together
        workers[-1].send_signal(signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert "received SIGUSR1" in output
    stopped_at = max(metrics(run_dir))
    assert 3 <= stopped_at < 100000
    assert (ckpt / "latest").read_text().strip() == f"iter_{stopped_at:07d}"

    # The requeued job (same command) continues from that checkpoint.
    again = megatron_keye([*args[:3], *args[3:], f"--schedule.exit_at_iteration={stopped_at + 1}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(metrics(run_dir)) == stopped_at + 1
    assert f"iter_{stopped_at + 1:07d}" == (ckpt / "latest").read_text().strip()


def test_requeued_finetune_resumes_from_its_own_checkpoint_not_the_base(tmp_path):
    base, ckpt = tmp_path / "base", tmp_path / "finetune"
    single = [*COMMON, "--parallel.tensor=1", "--parallel.pipeline=1"]
    first = megatron_keye(["train", *single, f"--logging.output_dir={tmp_path / 'b'}",
                           f"--checkpoint.save_dir={base}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (base / "latest").read_text().strip() == "iter_0000003"

    finetune = ["train", *single, "--schedule.train_iters=6",
                f"--checkpoint.load={base}", "--checkpoint.load_weights_only=true",
                f"--checkpoint.save_dir={ckpt}", f"--logging.output_dir={tmp_path / 'f'}"]
    started = megatron_keye([*finetune, "--schedule.exit_at_iteration=2"])
    assert started.returncode == 0, started.stderr[-3000:]
    assert "starting from checkpoint.load" in started.stderr
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"

    requeued = megatron_keye([*finetune, "--schedule.exit_at_iteration=4"])
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resuming this run from its save_dir" in requeued.stderr
    assert f"checkpoint.load={base} is ignored" in requeued.stderr
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # continued at 3, not restarted at 1
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert (ckpt / "iter_0000002" / "metadata.json").exists()  # its own history is intact


def test_checkpoint_of_another_vocabulary_is_refused_in_one_line(tmp_path):
    single = [*COMMON, "--parallel.tensor=1", "--parallel.pipeline=1",
              "--schedule.train_iters=1", "--schedule.warmup_iters=0"]
    base = tmp_path / "base"
    first = megatron_keye(["train", *single, f"--logging.output_dir={tmp_path / 'b'}",
                           f"--checkpoint.save_dir={base}"])
    assert first.returncode == 0, first.stderr[-3000:]
    other = megatron_keye(["train", *single, "--model.vocab_size=4096",
                           f"--checkpoint.load={base}", f"--checkpoint.save_dir={tmp_path / 'o'}",
                           f"--logging.output_dir={tmp_path / 'o'}"])
    assert other.returncode == 2
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.vocab_size: checkpoint") and "4096" in last
    assert not (tmp_path / "o" / "latest").exists()


def test_rl_stage_with_a_missing_prompts_file_is_refused_in_one_line(tmp_path):
    missing = tmp_path / "no-prompts.jsonl"
    done = megatron_keye(["train", "--recipe", "tiny-cpu-gspo", "--parallel.tensor=1",
                          "--parallel.data=1", "--checkpoint.load=", "--model.vision=null",
                          f"--rl.prompts={missing}", f"--logging.output_dir={tmp_path / 'o'}",
                          f"--checkpoint.save_dir={tmp_path / 'c'}",
                          "--logging.wandb_mode=disabled"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: rl.prompts: {missing} does not exist"
