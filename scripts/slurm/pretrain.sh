#!/bin/bash
#SBATCH --job-name=mamba-2.8b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=outputs/slurm/%x-%j.out
#
# Pretrain on several nodes under SLURM: srun starts one torchrun per node, torchrun one process per GPU.
#
#   mkdir -p outputs/slurm && sbatch scripts/slurm/pretrain.sh [more pretrain.py flags]
#
# Extra arguments are appended to pretrain.py's flags. Resubmitting resumes from the newest checkpoint
# in CHECKPOINT_DIR. Check the plan on the login node first: the same pretrain.py flags plus
#   --dry-run --dry-run-world-size 32 --dry-run-gpus-per-node 8
# Hyperparameters: the 2.8B recipe of scripts/abci/A-node/mamba-2.8b.sh (batch 1024 x 2048, lr 8e-4 ->
# 1e-5 cosine, 2,000 warmup, AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0); 80 GB GPUs (H100/H200)
# fit micro batch 8 without activation checkpointing.
set -euo pipefail

# ---- paths ----
DATA_PATH=(0.5 data/ja_wiki_text_document 0.5 data/en_wiki_text_document)
TOKENIZER_MODEL=tokenizers/tokenizer.model
CHECKPOINT_DIR=checkpoints/mamba-2.8b

# ---- model and hyperparameters ----
MODEL=2.8b
SEQ_LENGTH=2048
MICRO_BATCH_SIZE=8
GLOBAL_BATCH_SIZE=1024
TRAIN_ITERS=191000
LR=8e-4
MIN_LR=1e-5
LR_WARMUP_ITERS=2000
SAVE_INTERVAL=500

# ---- cluster (keep in line with the #SBATCH lines) ----
NUM_NODES=${SLURM_JOB_NUM_NODES:?submit this script with sbatch}
GPUS_PER_NODE=8
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))

mkdir -p "${CHECKPOINT_DIR}"
srun --ntasks-per-node=1 \
  torchrun --nnodes "${NUM_NODES}" --nproc-per-node "${GPUS_PER_NODE}" \
  --rdzv-id "${SLURM_JOB_ID}" --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
  pretrain.py \
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
  --low-cpu-fsdp \
  --save "${CHECKPOINT_DIR}" \
  --load "${CHECKPOINT_DIR}" \
  --save-interval "${SAVE_INTERVAL}" \
  "$@"
