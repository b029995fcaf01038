"""examples/slurm/train.sbatch under a fake slurm: two "nodes" on this machine.

`srun` and `scontrol` are stand-ins on PATH that do what slurm does for the script: srun starts
one task per node with the variables slurm sets (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID,
SLURM_NTASKS, SLURM_STEP_NODELIST), scontrol expands the node list and records requeues. The
script itself, torchrun_node.sh, torchrun's c10d rendezvous and the trainer are the real ones.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "examples" / "slurm"

FAKE_SRUN = r"""#!/bin/bash
echo "$*" >> "$FAKE_SLURM_LOG/srun.args"
ntasks=$SLURM_NNODES
while [ $# -gt 0 ]; do
    case "$1" in
        --ntasks=*) ntasks=${1#--ntasks=} ;;
        --ntasks-per-node=*) ntasks=$((SLURM_NNODES * ${1#--ntasks-per-node=})) ;;
        -*) ;;
        *) break ;;
    esac
    shift
done
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 SLURM_NTASKS=$ntasks SLURM_STEP_ID=0 \
        SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_SLURM_LOG/scontrol.args"
if [ "$1" = show ] && [ "$2" = hostnames ]; then
    for ((i = 0; i < SLURM_NNODES; i++)); do echo localhost; done
fi
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install(bin_dir: Path, name: str, text: str) -> None:
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_train_sbatch_two_fake_nodes_trains_and_does_not_requeue_a_finished_run(tmp_path):
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    _install(bin_dir, "srun", FAKE_SRUN)
    _install(bin_dir, "scontrol", FAKE_SCONTROL)
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(log_dir),
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_GPUS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1",
        "SLURM_SUBMIT_DIR": str(REPO), "KEYE_PYTHON": sys.executable,
        "KEYE_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
    }
    overrides = ["--parallel.tensor=1", "--parallel.pipeline=1", "--parallel.data=2",
                 "--parallel.sequence_parallel=false", "--schedule.train_iters=2",
                 "--schedule.warmup_iters=1", "--schedule.global_batch_size=4",
                 "--schedule.micro_batch_size=2", "--data.seq_length=32",
                 "--data.num_documents=100", "--logging.wandb_mode=disabled",
                 "--logging.log_interval=1",
                 f"--logging.output_dir={run_dir}", f"--checkpoint.save_dir={ckpt}"]
    done = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"), "tiny-cpu-text", *overrides],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # the dry run ran first and accepted the layout for 2 nodes x 1 GPU
    assert "recipe tiny-cpu-text: 2 node(s) x 1 GPUs = 2 ranks" in output
    assert "feasible" in output
    # srun started torchrun_node.sh once per node with the trainer as its module
    srun_calls = (log_dir / "srun.args").read_text().splitlines()
    assert len(srun_calls) == 1
    assert "--ntasks-per-node=1" in srun_calls[0]
    assert "torchrun_node.sh -m megatron_keye.train --recipe tiny-cpu-text" in srun_calls[0]
    # both nodes' torchruns met in one c10d rendezvous: one world of two data-parallel ranks
    assert "'data': 2" in output and "starting at iteration 0 of 2" in output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    # finished: no requeue; scontrol was only asked for the node list
    scontrol = (log_dir / "scontrol.args").read_text().splitlines()
    assert scontrol and all(line.startswith("show hostnames gpu[01-02]") for line in scontrol)
    assert "megatron-keye: finished (2 iterations checkpointed)" in output
