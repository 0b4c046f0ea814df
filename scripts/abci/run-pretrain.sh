#!/bin/bash
# The launch half of every ABCI training job (scripts/abci/{A,V}-node/*.sh): modules, hostfile, rank-0
# address and the mpirun line. A job script sets its paths, model and hyperparameters, then sources
# this file from the repository root (qsub -cwd); its extra arguments reach pretrain.py.
#
# Expected from the job script: VENV, CHECKPOINT_DIR, DATA_PATH (array), MODEL_FLAGS (array: --model or
# --base-model plus the tokenizer flags), PRECISION_FLAG, EXTRA_FLAGS (array, may be empty),
# GPUS_PER_NODE, SEQ_LENGTH, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_ITERS, LR, MIN_LR,
# LR_WARMUP_ITERS, WEIGHT_DECAY, GRAD_CLIP_NORM, SHARDING_STRATEGY, SAVE_INTERVAL, EXIT_DURATION_MINUTES.
# shellcheck disable=SC2154  # all of the above are assigned by the job script that sources this file
set -euo pipefail

# ---- cluster ----
NUM_NODES=${NHOSTS:?submit this script with qsub, which sets NHOSTS}
NUM_GPUS=$((NUM_NODES * GPUS_PER_NODE))
HOSTFILE=hostfile/hostfile_${JOB_ID}
CUDA_MODULE=cuda/12.1/12.1.1
CUDNN_MODULE=cudnn/8.9/8.9.2
NCCL_MODULE=nccl/2.18/2.18.1-1
HPCX_MODULE=hpcx/2.12

# The venv first, then the modules: HPC-X's mpirun must come before the one the venv's openmpi
# package installs. Neither script is written for nounset.
set +u
# shellcheck source=/dev/null
source "${VENV}/bin/activate"
# shellcheck source=/dev/null
source /etc/profile.d/modules.sh
module load "${CUDA_MODULE}" "${CUDNN_MODULE}" "${NCCL_MODULE}" "${HPCX_MODULE}"
set -u

# Rank 0 runs on this host, the first of the job; the ranks reach it over bond0.
MASTER_ADDR=$(/usr/sbin/ip -4 addr show dev bond0 | awk '/inet / {sub("/.*", "", $2); print $2; exit}')
MASTER_PORT=$((10000 + JOB_ID % 50000))
export MASTER_ADDR MASTER_PORT

mkdir -p "$(dirname "${HOSTFILE}")" "${CHECKPOINT_DIR}"
awk -v slots="${GPUS_PER_NODE}" '{print $1 " slots=" slots}' "${SGE_JOB_HOSTLIST}" > "${HOSTFILE}"

mpirun -np "${NUM_GPUS}" --npernode "${GPUS_PER_NODE}" \
  -hostfile "${HOSTFILE}" \
  -x MASTER_ADDR -x MASTER_PORT -x PATH -x LD_LIBRARY_PATH \
  -bind-to none -map-by slot \
  python pretrain.py \
  --use-mpi \
  "${MODEL_FLAGS[@]}" \
  --data-path "${DATA_PATH[@]}" \
  --seq-length "${SEQ_LENGTH}" \
  --micro-batch-size "${MICRO_BATCH_SIZE}" \
  --global-batch-size "${GLOBAL_BATCH_SIZE}" \
  --train-iters "${TRAIN_ITERS}" \
  --lr "${LR}" \
  --min-lr "${MIN_LR}" \
  --lr-decay-style cosine \
  --lr-warmup-iters "${LR_WARMUP_ITERS}" \
  --weight-decay "${WEIGHT_DECAY}" \
  --adam-beta1 0.9 \
  --adam-beta2 0.95 \
  --grad-clip-norm "${GRAD_CLIP_NORM}" \
  "${PRECISION_FLAG}" \
  --sharding-strategy "${SHARDING_STRATEGY}" \
  "${EXTRA_FLAGS[@]}" \
  --low-cpu-fsdp \
  --eval-interval 500 \
  --eval-iters 10 \
  --save "${CHECKPOINT_DIR}" \
  --load "${CHECKPOINT_DIR}" \
  --save-interval "${SAVE_INTERVAL}" \
  --exit-duration-in-mins "${EXIT_DURATION_MINUTES}" \
  "$@"
