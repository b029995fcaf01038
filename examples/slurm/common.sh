# Sourced by the sbatch scripts in this directory: the cluster environment, the rendezvous of
# one job, and the requeue-on-progress rule. (sbatch runs a copy of the script from a spool
# directory, so the scripts find this file through $KEYE_SLURM_DIR, by default
# $SLURM_SUBMIT_DIR/examples/slurm: submit from the repository root or set KEYE_SLURM_DIR.)

# The Python that has megatron-keye installed (an activated venv's `python` by default).
KEYE_PYTHON=${KEYE_PYTHON:-python}
export KEYE_PYTHON

keye_cluster_env() {
    # GPUs per node from slurm (--gpus-per-node=8 or =h100:8), else 8.
    local gpus=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    export KEYE_GPUS_PER_NODE=${KEYE_GPUS_PER_NODE:-${gpus##*:}}
    local cpus=${SLURM_CPUS_PER_TASK:-$((KEYE_GPUS_PER_NODE * 8))}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / KEYE_GPUS_PER_NODE > 0 ? cpus / KEYE_GPUS_PER_NODE : 1))}
    # megatron-core: one CUDA connection keeps tensor-parallel communication ordered with
    # compute (sequence-parallel overlap relies on it).
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # NCCL: fail a hung collective with an error instead of hanging the job forever, and
    # tolerate short InfiniBand hiccups before giving up.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
    export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
    # Site-specific: the HCAs and the bootstrap interface. Set them in the environment for
    # your cluster, e.g. NCCL_IB_HCA=mlx5_0,mlx5_1,...  NCCL_SOCKET_IFNAME=ib0 (or bond0).
    if [ -n "${KEYE_NCCL_IB_HCA:-}" ]; then export NCCL_IB_HCA=$KEYE_NCCL_IB_HCA; fi
    if [ -n "${KEYE_NCCL_SOCKET_IFNAME:-}" ]; then export NCCL_SOCKET_IFNAME=$KEYE_NCCL_SOCKET_IFNAME; fi
}

keye_rendezvous() {
    # The c10d store lives on the first node of the allocation (it hosts it: is_host below).
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-localhost}}
    # (all of the list, then its first line: `| head -n 1` would SIGPIPE scontrol on a long
    # list and fail the script under pipefail)
    local hosts
    hosts=$(scontrol show hostnames "$nodelist")
    export KEYE_HEAD=${hosts%%$'\n'*}
    export KEYE_PORT=${KEYE_PORT:-29500}
}

# Checkpointed iterations of a recipe (or of a list of pipeline stages), summed.
keye_progress() {
    "$KEYE_PYTHON" -m megatron_keye.cli pipeline --progress "$@"
}

# After the run step: done (exit 0), or requeue this job when the checkpoint moved forward
# (a stop before the time limit or a preemption), or fail without requeueing when it did not
# (a crash would otherwise loop). The requeued job runs the same command and resumes from
# checkpoint.save_dir/latest.
keye_finish_or_requeue() {
    local before=$1
    shift
    local after status=0
    after=$(keye_progress "$@") || status=$?
    if [ "$status" -eq 0 ]; then
        echo "megatron-keye: finished (${after} iterations checkpointed)"
        return 0
    fi
    if [ "$status" -ne 3 ]; then
        echo "megatron-keye: cannot read the run's progress (exit $status)" >&2
        return "$status"
    fi
    if [ "${after:-0}" -gt "$before" ]; then
        echo "megatron-keye: stopped at ${after} iterations (was ${before}); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    echo "megatron-keye: no progress in this job (still ${after} iterations); not requeueing" >&2
    return 1
}
