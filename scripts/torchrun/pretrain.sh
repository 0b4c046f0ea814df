#!/bin/bash
# Pretrain on one machine with torchrun, one process per GPU (e.g. 8 x H100/H200, bf16).
#
#   bash scripts/torchrun/pretrain.sh [more pretrain.py flags]
#
# Extra arguments are appended to pretrain.py's flags (the last value of a flag wins); add --dry-run to
# print the plan (batch arithmetic, parameters, memory per GPU) without training. Rerunning resumes
# from the newest checkpoint in CHECKPOINT_DIR.
#
# Hyperparameters of MODEL=1.4b: the Mamba paper's (arXiv:2312.00752, Appendix E.2.1): 0.5M-token batch,
# 50,000 steps, peak learning rate 5x GPT-3's (1e-3), cosine decay to 1e-5, AdamW (0.9, 0.95), weight
# decay 0.1, clipping 1.0. Other sizes: see scripts/abci/A-node/mamba-*.sh (same values per size).
set -euo pipefail

# ---- paths ----
DATA_PATH=(data/corpus_text_document)  # Megatron prefix(es), or WEIGHT PREFIX pairs
TOKENIZER_MODEL=tokenizers/tokenizer.model
CHECKPOINT_DIR=checkpoints/mamba-1.4b

# ---- model and hyperparameters ----
MODEL=1.4b
SEQ_LENGTH=2048
MICRO_BATCH_SIZE=8
GLOBAL_BATCH_SIZE=256
TRAIN_ITERS=50000
LR=1e-3
MIN_LR=1e-5
LR_WARMUP_ITERS=715
SAVE_INTERVAL=1000

# ---- machine ----
GPUS_PER_NODE=8

torchrun --standalone --nproc-per-node "${GPUS_PER_NODE}" \
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
  --save "${CHECKPOINT_DIR}" \
  --load "${CHECKPOINT_DIR}" \
  --save-interval "${SAVE_INTERVAL}" \
  "$@"
