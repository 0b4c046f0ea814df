#!/usr/bin/env bash
# Smoke test of a trained model: a few prompts through inference.py, completions to a JSONL file.
#
#   bash scripts/inference_test.sh                 # paths below
#   CHECKPOINT=/path/to/run bash scripts/inference_test.sh
#
# On ABCI submit it as a job (qsub -g GROUP scripts/inference_test.sh) after `module load` of the CUDA
# matching your torch build; on a machine without a GPU it runs on the CPU reference kernels.
#$ -l rt_AF=1
#$ -l h_rt=00:30:00
#$ -j y
#$ -o outputs/inference/
#$ -cwd
set -euo pipefail

# ---- paths and settings (override any of them from the environment) ----
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV_DIR=${VENV_DIR:-$REPO_DIR/.venv}
# A kotomamba run's --save directory (or one iter_* inside it), a mamba-ssm model directory, or a
# Hugging Face Mamba directory.
CHECKPOINT=${CHECKPOINT:-$REPO_DIR/checkpoints/mamba-130m}
# Empty: use the tokenizer saved with the model.
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-}
OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/outputs/inference}
PROMPT=${PROMPT:-"United States of America"}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
TEMPERATURE=${TEMPERATURE:-0.7}
TOP_P=${TOP_P:-0.9}
REPETITION_PENALTY=${REPETITION_PENALTY:-1.2}
SEED=${SEED:-1234}

if [ -f "$VENV_DIR/bin/activate" ]; then
  # shellcheck source=/dev/null
  source "$VENV_DIR/bin/activate"
fi
if [ ! -e "$CHECKPOINT" ]; then
  echo "inference_test.sh: CHECKPOINT=$CHECKPOINT does not exist; set CHECKPOINT to a model directory" >&2
  exit 2
fi
mkdir -p "$OUTPUT_DIR"

tokenizer_args=()
if [ -n "$TOKENIZER_MODEL" ]; then
  tokenizer_args+=(--tokenizer-model "$TOKENIZER_MODEL")
fi
if [ -n "$TOKENIZER_TYPE" ]; then
  tokenizer_args+=(--tokenizer-type "$TOKENIZER_TYPE")
fi

cd "$REPO_DIR"

# 1. One prompt, streamed to the terminal, sampled as in kotomamba's inference_test.sh.
python inference.py --load "$CHECKPOINT" "${tokenizer_args[@]}" \
  --prompt "$PROMPT" \
  --max-new-tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" --top-p "$TOP_P" \
  --repetition-penalty "$REPETITION_PENALTY" --seed "$SEED"

# 2. Greedy completions of several prompts (English and Japanese), decoded as one batch.
prompt_file="$OUTPUT_DIR/prompts.txt"
printf '%s\n' "$PROMPT" "The capital of Japan is" "日本の首都は" "吾輩は猫である。" > "$prompt_file"
python inference.py --load "$CHECKPOINT" "${tokenizer_args[@]}" \
  --prompt-file "$prompt_file" --greedy --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 4 \
  --output "$OUTPUT_DIR/greedy.jsonl"
echo "inference_test.sh: completions written to $OUTPUT_DIR/greedy.jsonl"
