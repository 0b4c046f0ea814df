#!/bin/bash
# Pretrain on several nodes with Open MPI's mpirun (no scheduler specifics): one process per GPU,
# ranks from OMPI_COMM_WORLD_* (--use-mpi), rendezvous at MASTER_ADDR:MASTER_PORT.
#
#   bash scripts/mpirun/pretrain.sh [more pretrain.py flags]
#
# HOSTFILE lists one node per line as "HOSTNAME slots=GPUS_PER_NODE"; this script runs on its first
# node, where rank 0 lands (-map-by slot). Extra arguments are appended to pretrain.py's flags; add
# --dry-run to print the plan without training.
# Hyperparameters of MODEL=790m: the Mamba paper's (arXiv:2312.00752, Appendix E.2.1): 0.5M-token batch,
# 29,000 steps, peak learning rate 5x GPT-3's (1.25e-3), cosine decay to 1e-5, AdamW (0.9, 0.95), weight
# decay 0.1, clipping 1.0.
set -euo pipefail

# ---- paths ----
HOSTFILE=hostfile
DATA_PATH=(data/corpus_text_document)
TOKENIZER_MODEL=tokenizers/tokenizer.model
CHECKPOINT_DIR=checkpoints/mamba-790m

# ---- model and hyperparameters ----
MODEL=790m
SEQ_LENGTH=2048
MICRO_BATCH_SIZE=8
GLOBAL_BATCH_SIZE=256
TRAIN_ITERS=29000
LR=1.25e-3
MIN_LR=1e-5
LR_WARMUP_ITERS=715
SAVE_INTERVAL=1000

# ---- cluster ----
NUM_NODES=2
GPUS_PER_NODE=8
NUM_GPUS=$((NUM_NODES * GPUS_PER_NODE))
MASTER_ADDR=$(awk 'NR == 1 {print $1}' "${HOSTFILE}")
MASTER_PORT=29500
export MASTER_ADDR MASTER_PORT

mkdir -p "${CHECKPOINT_DIR}"
mpirun -np "${NUM_GPUS}" --npernode "${GPUS_PER_NODE}" \
  -hostfile "${HOSTFILE}" \
  -x MASTER_ADDR -x MASTER_PORT -x PATH -x LD_LIBRARY_PATH \
  -bind-to none -map-by slot \
  python pretrain.py \
  --use-mpi \
  --model "${MODEL}" \
  --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "${TOKENIZER_MODEL}" \
  --data-path "${DATA_PATH[@]}" \
  --seq-length "${SEQ_LENGTH}" \
  --micro-batch-size "${MICRO_BATCH_SIZE}" \
  --global-batch-size "${GLOBAL_BATCH_SIZE}" \
  --train-iters "${TRAIN_ITERS}" \
  --lr "${LR}" \
  --min-lr "${MIN_LR}" \
  --lr-decay-style cosine \
  --lr-warmup-iters "${LR_WARMUP_ITERS}" \
  --weight-decay 0.1 \
  --adam-beta1 0.9 \
  --adam-beta2 0.95 \
  --grad-clip-norm 1.0 \
  --bf16 \
  --sharding-strategy FULL_SHARD \
  --save "${CHECKPOINT_DIR}" \
  --load "${CHECKPOINT_DIR}" \
  --save-interval "${SAVE_INTERVAL}" \
  "$@"
