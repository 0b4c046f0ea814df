#!/bin/bash
#$ -l rt_F=4
#$ -l h_rt=24:00:00
#$ -j y
#$ -o outputs/abci/V-node/mamba-130m/
#$ -cwd
#
# Mamba 130M from scratch on 4 ABCI V-nodes (4 x V100 16 GB each, 16 GPUs), fp16 with dynamic loss scaling (no bf16 on V100).
#
#   mkdir -p outputs/abci/V-node/mamba-130m
#   qsub -g YOUR_GROUP scripts/abci/V-node/mamba-130m.sh [more pretrain.py flags]
#
# Extra arguments are appended to pretrain.py's flags (the last value of a flag wins). Resubmitting
# the script resumes from the newest checkpoint in CHECKPOINT_DIR. Check the plan first on a login
# node (no GPU needed): the same pretrain.py flags plus
#   --dry-run --dry-run-world-size 16 --dry-run-gpus-per-node 4
# Batch: 256 = micro batch 4 x 16 GPUs x 4 accumulation steps; the micro batch keeps the
# dry run's memory estimate well inside V100 16 GB with a 50k vocabulary (a larger vocabulary needs more).
# V100 needs mamba-ssm/causal-conv1d kernels compiled for sm_70 and a torch build that still has
# sm_70 kernels (install.md, "ABCI").
#
# Hyperparameters: the Mamba paper (Gu & Dao 2023, arXiv:2312.00752), Appendix E.2.1 "Scaling Law
# Details": Table 12 gives GPT-3's model sizes with a 0.5M-token batch (256 x 2048) and Chinchilla-style
# step counts (125M: 4,800 steps); its "improved recipe" uses a peak learning rate 5x GPT-3's
# (125M: 6e-4 x 5 = 3e-3), linear warmup then cosine decay to 1e-5, AdamW betas (0.9, 0.95),
# weight decay 0.1, gradient clipping 1.0. Warmup: GPT-3's 375M tokens = 715 iterations.
set -euo pipefail

# ---- paths: edit these ----
GROUP_DIR=/groups/YOUR_GROUP
DATASET_DIR=${GROUP_DIR}/datasets
TOKENIZER_MODEL=${GROUP_DIR}/tokenizers/tokenizer.model
CHECKPOINT_DIR=${GROUP_DIR}/checkpoints/V-node/mamba-130m
VENV=.venv
# --data-path: WEIGHT PREFIX pairs; a prefix is preprocess_data.py's output without .bin/.idx.
DATA_PATH=(
  0.5 "${DATASET_DIR}/ja_wiki_text_document"
  0.5 "${DATASET_DIR}/en_wiki_text_document"
)

# ---- model and hyperparameters ----
MODEL=130m
SEQ_LENGTH=2048
MICRO_BATCH_SIZE=4
GLOBAL_BATCH_SIZE=256
TRAIN_ITERS=4800
LR=3e-3
MIN_LR=1e-5
LR_WARMUP_ITERS=715
WEIGHT_DECAY=0.1
GRAD_CLIP_NORM=1.0
SHARDING_STRATEGY=SHARD_GRAD_OP
SAVE_INTERVAL=1000
# Save and stop 30 minutes before h_rt ends, so that the next submission resumes from there.
EXIT_DURATION_MINUTES=1410

PRECISION_FLAG=--fp16
EXTRA_FLAGS=()
MODEL_FLAGS=(--model "${MODEL}" --tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOKENIZER_MODEL}")

# ---- cluster ----
GPUS_PER_NODE=4

# Modules, hostfile, rank-0 address and the mpirun line, shared by every ABCI training job.
# shellcheck source=scripts/abci/run-pretrain.sh
source scripts/abci/run-pretrain.sh
