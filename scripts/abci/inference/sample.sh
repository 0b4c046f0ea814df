#!/bin/bash
#$ -l rt_AG.small=1
#$ -l h_rt=1:00:00
#$ -j y
#$ -o outputs/abci/inference/
#$ -cwd
#
# Generate text from a checkpoint written by pretrain.py --save, on one A100 of an ABCI A-node.
#
#   mkdir -p outputs/abci/inference
#   qsub -g YOUR_GROUP scripts/abci/inference/sample.sh
#
# Writes sampled completions (NUM_SAMPLES per prompt) and one greedy completion to OUTPUT_DIR as JSON lines.
set -euo pipefail

# ---- paths: edit these ----
GROUP_DIR=/groups/YOUR_GROUP
CHECKPOINT_DIR=${GROUP_DIR}/checkpoints/A-node/mamba-2.8b
TOKENIZER_MODEL=${GROUP_DIR}/tokenizers/tokenizer.model
OUTPUT_DIR=outputs/abci/inference
VENV=.venv

# ---- generation ----
PROMPT="東京工業大学は、"
MAX_NEW_TOKENS=256
NUM_SAMPLES=4
TEMPERATURE=0.7
TOP_P=0.9
REPETITION_PENALTY=1.2
SEED=1234
CUDA_MODULE=cuda/12.1/12.1.1

set +u  # Environment Modules' and the venv's scripts are not written for nounset
# shellcheck source=/dev/null
source /etc/profile.d/modules.sh
module load "${CUDA_MODULE}"
# shellcheck source=/dev/null
source "${VENV}/bin/activate"
set -u

mkdir -p "${OUTPUT_DIR}"
python inference.py \
  --load "${CHECKPOINT_DIR}" \
  --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "${TOKENIZER_MODEL}" \
  --prompt "${PROMPT}" \
  --max-new-tokens "${MAX_NEW_TOKENS}" \
  --num-samples "${NUM_SAMPLES}" \
  --temperature "${TEMPERATURE}" \
  --top-p "${TOP_P}" \
  --repetition-penalty "${REPETITION_PENALTY}" \
  --seed "${SEED}" \
  --output "${OUTPUT_DIR}/samples.jsonl"

python inference.py \
  --load "${CHECKPOINT_DIR}" \
  --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "${TOKENIZER_MODEL}" \
  --prompt "${PROMPT}" \
  --max-new-tokens "${MAX_NEW_TOKENS}" \
  --greedy \
  --output "${OUTPUT_DIR}/greedy.jsonl"
