#!/bin/bash
#$ -l rt_AF=4
#$ -l h_rt=72:00:00
#$ -j y
#$ -o outputs/abci/A-node/mamba-2.8b-continual/
#$ -cwd
#
# Continual pretraining of Mamba 2.8B on 4 ABCI A-nodes (8 x A100 40 GB each, 32 GPUs), bf16.
#
#   mkdir -p outputs/abci/A-node/mamba-2.8b-continual
#   qsub -g YOUR_GROUP scripts/abci/A-node/mamba-2.8b-continual.sh [more pretrain.py flags]
#
# Extra arguments are appended to pretrain.py's flags (the last value of a flag wins). Resubmitting
# the script resumes from the newest checkpoint in CHECKPOINT_DIR. Check the plan first on a login
# node (no GPU needed): the same pretrain.py flags plus
#   --dry-run --dry-run-world-size 32 --dry-run-gpus-per-node 8
# Batch: 1024 = micro batch 4 x 32 GPUs x 8 accumulation steps; the micro batch keeps the
# dry run's memory estimate well inside A100 40 GB with a 50k vocabulary (a larger vocabulary needs more).
#
# Continual pretraining: the weights of BASE_MODEL_DIR (a mamba-ssm / Hugging Face checkpoint
# directory with config.json and model.safetensors or pytorch_model.bin, e.g. state-spaces/mamba-2.8b)
# are trained further on new data at a low learning rate: 6e-5 with 1,000 warmup iterations, cosine
# decay to 6e-6; batch, optimizer, weight decay and clipping as the 2.8B run from scratch. The data
# must be tokenized with the base model's tokenizer (GPT-NeoX's for state-spaces/mamba-*, see
# scripts/abci/data/tokenize-huggingface.sh): the tokenizer may not have more tokens than the base
# model's embedding has rows. TRAIN_ITERS x 1024 x 2048 is the token budget (25,000: 52B tokens).
set -euo pipefail

# ---- paths: edit these ----
GROUP_DIR=/groups/YOUR_GROUP
DATASET_DIR=${GROUP_DIR}/datasets
BASE_MODEL_DIR=${GROUP_DIR}/hf_checkpoints/mamba-2.8b
TOKENIZER_DIR=${GROUP_DIR}/tokenizers/gpt-neox-20b
CHECKPOINT_DIR=${GROUP_DIR}/checkpoints/A-node/mamba-2.8b-continual
VENV=.venv
# --data-path: WEIGHT PREFIX pairs; a prefix is preprocess_data.py's output without .bin/.idx.
DATA_PATH=(
  0.5 "${DATASET_DIR}/ja_wiki_text_document"
  0.5 "${DATASET_DIR}/en_wiki_text_document"
)

# ---- model and hyperparameters ----
SEQ_LENGTH=2048
MICRO_BATCH_SIZE=4
GLOBAL_BATCH_SIZE=1024
TRAIN_ITERS=25000
LR=6e-5
MIN_LR=6e-6
LR_WARMUP_ITERS=1000
WEIGHT_DECAY=0.1
GRAD_CLIP_NORM=1.0
SHARDING_STRATEGY=FULL_SHARD
SAVE_INTERVAL=500
# Save and stop 30 minutes before h_rt ends, so that the next submission resumes from there.
EXIT_DURATION_MINUTES=4290

PRECISION_FLAG=--bf16
EXTRA_FLAGS=("--fsdp-activation-checkpointing")
MODEL_FLAGS=(--base-model "${BASE_MODEL_DIR}" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER_DIR}")

# ---- cluster ----
GPUS_PER_NODE=8

# Modules, hostfile, rank-0 address and the mpirun line, shared by every ABCI training job.
# shellcheck source=scripts/abci/run-pretrain.sh
source scripts/abci/run-pretrain.sh
