#!/bin/bash
# Run by `srun --ntasks-per-node=1` once on every node: torchrun with this node's rank and one
# process per GPU, the c10d rendezvous store hosted by the first node ($KEYE_HEAD:$KEYE_PORT,
# set by common.sh's keye_rendezvous). Ranks get SIGUSR1/SIGTERM forwarded by torchrun and
# 110 s to save a checkpoint before it kills them (slurm signals 120 s before the limit).
#   srun --ntasks-per-node=1 bash torchrun_node.sh -m megatron_keye.train --recipe R ...
set -euo pipefail
if [ "${SLURM_NODEID:?run under srun}" = 0 ]; then IS_HOST=true; else IS_HOST=false; fi
exec "${KEYE_PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc-per-node="${KEYE_GPUS_PER_NODE:?}" \
    --node-rank="$SLURM_NODEID" \
    --rdzv-backend=c10d --rdzv-endpoint="${KEYE_HEAD:?}:${KEYE_PORT:?}" \
    --rdzv-id="${SLURM_JOB_ID:?}" --rdzv-conf="is_host=$IS_HOST" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=110 \
    "$@"
