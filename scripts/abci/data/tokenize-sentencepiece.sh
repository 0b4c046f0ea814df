#!/bin/bash
#$ -l rt_F=1
#$ -l h_rt=24:00:00
#$ -j y
#$ -o outputs/abci/data/
#$ -cwd
#
# Tokenize JSONL with a SentencePiece model into Megatron-LM .bin/.idx files, on one ABCI node's CPUs.
#
#   mkdir -p outputs/abci/data
#   qsub -g YOUR_GROUP scripts/abci/data/tokenize-sentencepiece.sh
#
# Writes ${OUTPUT_PREFIX}_text_document.bin/.idx (one pair per JSON key); pass
# ${OUTPUT_PREFIX}_text_document to pretrain.py's --data-path. --append-eod ends every document with
# the tokenizer's end-of-document id, so that documents packed into one sample stay separated.
# INPUT may be a glob (quoted, so that preprocess_data.py expands it, in sorted order).
set -euo pipefail

# ---- paths: edit these ----
GROUP_DIR=/groups/YOUR_GROUP
INPUT="${GROUP_DIR}/raw/ja_wiki/*.jsonl"
OUTPUT_PREFIX=${GROUP_DIR}/datasets/ja_wiki
TOKENIZER_MODEL=${GROUP_DIR}/tokenizers/tokenizer.model
VENV=.venv

# ---- tokenization ----
JSON_KEYS=text
WORKERS=64     # tokenizer processes in all (a V-node has 80 hardware threads)
PARTITIONS=1   # >1 splits the input into parts processed in parallel, then merged

set +u  # the venv's activate script is not written for nounset
# shellcheck source=/dev/null
source "${VENV}/bin/activate"
set -u

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"
python megatron_lm/tools/preprocess_data.py \
  --input "${INPUT}" \
  --json-keys "${JSON_KEYS}" \
  --output-prefix "${OUTPUT_PREFIX}" \
  --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "${TOKENIZER_MODEL}" \
  --append-eod \
  --workers "${WORKERS}" \
  --partitions "${PARTITIONS}"
