#!/usr/bin/env bash
# The demo: tokenize the bundled Japanese/English corpus, train a small Mamba-2 on it (CPU is fine: a
# few minutes), then sample from it. Mamba-2 because its CPU reference path is chunked; Mamba-1's is a
# per-token loop whose backward is far slower on a CPU. Every size is a variable; override any of them from the
# environment, e.g.  TRAIN_ITERS=20 bash scripts/demo/demo.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK_DIR=${WORK_DIR:-$REPO/runs/demo}
CORPUS=${CORPUS:-$REPO/data/demo/corpus.jsonl}
MODEL_CONFIG=${MODEL_CONFIG:-$REPO/scripts/demo/mamba-demo.json}
VOCAB_SIZE=${VOCAB_SIZE:-4000}
SEQ_LENGTH=${SEQ_LENGTH:-128}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-8}
TRAIN_ITERS=${TRAIN_ITERS:-150}
LR=${LR:-3e-3}
NPROC=${NPROC:-1}

TOKENIZER_MODEL=$WORK_DIR/tokenizer/demo.model
DATA_PREFIX=$WORK_DIR/data/demo
CHECKPOINTS=$WORK_DIR/checkpoints
mkdir -p "$WORK_DIR/data"

if [ ! -f "$TOKENIZER_MODEL" ]; then
  python "$REPO/scripts/demo/train_tokenizer.py" --input "$CORPUS" --vocab-size "$VOCAB_SIZE" \
    --output "$TOKENIZER_MODEL"
fi

python "$REPO/megatron_lm/tools/preprocess_data.py" \
  --input "$CORPUS" --json-keys text --output-prefix "$DATA_PREFIX" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
  --append-eod --workers 1

torchrun --standalone --nproc-per-node "$NPROC" "$REPO/pretrain.py" \
  --model "$MODEL_CONFIG" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
  --data-path "${DATA_PREFIX}_text_document" --split 95,5,0 \
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr 3e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
  --weight-decay 0.1 --adam-beta2 0.95 --grad-clip-norm 1.0 \
  --eval-interval 50 --eval-iters 2 --log-interval 10 --num-workers 1 \
  --save "$CHECKPOINTS" --save-interval 50

python "$REPO/inference.py" --load "$CHECKPOINTS" --prompt "吾輩は" --max-new-tokens 40 --seed 1
echo "loss curves: $CHECKPOINTS/loss_curves.png (metrics: $CHECKPOINTS/metrics.jsonl)"
