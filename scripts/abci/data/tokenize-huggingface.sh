#!/bin/bash
#$ -l rt_F=1
#$ -l h_rt=24:00:00
#$ -j y
#$ -o outputs/abci/data/
#$ -cwd
#
# Tokenize JSONL with a Hugging Face tokenizer (a local directory or tokenizer.json) into Megatron-LM
# .bin/.idx files, on one ABCI node's CPUs. Continual pretraining of state-spaces/mamba-* needs their
# tokenizer, GPT-NeoX-20B's: download it once on a login node, e.g.
#   python -c "from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('EleutherAI/gpt-neox-20b').save_pretrained('DIR')"
#
#   mkdir -p outputs/abci/data
#   qsub -g YOUR_GROUP scripts/abci/data/tokenize-huggingface.sh
#
# Writes ${OUTPUT_PREFIX}_text_document.bin/.idx; pass ${OUTPUT_PREFIX}_text_document to --data-path.
# --append-eod ends every document with the tokenizer's eos id.
set -euo pipefail

# ---- paths: edit these ----
GROUP_DIR=/groups/YOUR_GROUP
INPUT="${GROUP_DIR}/raw/en_wiki/*.jsonl.gz"
OUTPUT_PREFIX=${GROUP_DIR}/datasets/en_wiki-neox
TOKENIZER_DIR=${GROUP_DIR}/tokenizers/gpt-neox-20b
VENV=.venv

# ---- tokenization ----
JSON_KEYS=text
WORKERS=64     # tokenizer processes in all (a V-node has 80 hardware threads)
PARTITIONS=4   # input parts processed in parallel (WORKERS / PARTITIONS workers each), then merged

set +u  # the venv's activate script is not written for nounset
# shellcheck source=/dev/null
source "${VENV}/bin/activate"
set -u

mkdir -p "$(dirname "${OUTPUT_PREFIX}")"
python megatron_lm/tools/preprocess_data.py \
  --input "${INPUT}" \
  --json-keys "${JSON_KEYS}" \
  --output-prefix "${OUTPUT_PREFIX}" \
  --tokenizer-type HuggingFaceTokenizer \
  --tokenizer-model "${TOKENIZER_DIR}" \
  --append-eod \
  --workers "${WORKERS}" \
  --partitions "${PARTITIONS}"
