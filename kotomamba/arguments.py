"""Command-line interface of ``pretrain.py``: Megatron-LM flag names, kotomamba's old names as aliases.

The help string of each flag is its documentation (``python pretrain.py --help``). ``parse_args``
parses, merges ``--config FILE.yaml`` (command line wins) and validates each flag; every problem
raises :class:`ArgumentError` whose message names the flag and value. What depends on the world
size or on other flags (global batch, accumulation steps, the iteration schedule) is computed once,
by :func:`kotomamba.config.build_run_config`, which turns the flags into the run's frozen
configuration. Nothing here imports torch.

Option names may be written with ``_`` instead of ``-`` (``--wandb_name``, ``--low_cpu_fsdp``), as
kotomamba's scripts mixed both spellings; YAML keys likewise.

kotomamba flags found in kotoba-tech/kotomamba and what they map to here
----------------------------------------------------------------------------
Its last parser (``src/llama_recipes/arguments.py``, Megatron style, used by
``scripts/abci/training/A-node/mambda-2.8b.sh``) -- same name and meaning here:
  --data-path --split --train-data-path --valid-data-path --test-data-path --data-cache-path
  --vocab-size --seq-length --num-workers --tokenizer-type --tokenizer-model --seed --use-mpi
  --wandb-entity --wandb-name --wandb-project --bf16 --fp16 --param-dtype --load --save
  --base-model --from-scratch --grad-clip-norm --eval-interval --eval-iters --save-interval --lr
  --min-lr --lr-decay-iters --lr-warmup-iters --train-iters --train-samples --global-batch-size
  --micro-batch-size --weight-decay --adam-beta1 --adam-beta2 --adam-eps --skip-batch
  --sharding-strategy --checkpoint-type --fsdp-activation-checkpointing --fsdp-cpu-offload
  --low-cpu-fsdp
  Differences: --lr-decay-style accepts Megatron's styles (kotomamba had cosine|step; step is
  gone); --checkpoint-type defaults to SHARDED_STATE_DICT (kotomamba: LOCAL_STATE_DICT);
  --skip-batch takes FIRST LAST iteration pairs (kotomamba's took untyped strings).
  Accepted and ignored (no effect on a Mamba model or always on here): --mixed-precision, --mamba,
  --sliding-window-size, --attention-dropout, --hidden-dropout, --use-better-transformer,
  --reset-position-ids, --retro-return-doc-ids, --short-seq-prob,
  --vocab-file, --merge-file.
  Refused with an explanation (ignoring them would change the run): --quantization,
  --freeze-layers, --num-freeze-layers N>0, --vocab-extra-ids N>0, --optimizer anyprecision,
  --make-vocab-size-divisible-by. --reset-attention-mask is --reset-state-at-eod, and --eod-mask-loss
  masks as Megatron does.
Its earlier llama-recipes scripts (``scripts/abci/training/mambda-*.sh``, fire-style flags):
  --enable_fsdp, --save_model, --save_optimizer, --run_validation   accepted, no effect
  --pure_bf16, --use_bf16 -> --bf16      --use_fp16 -> --fp16       --use_fp32 -> --fp32
  --model_name -> --base-model           --tokenizer_name -> --tokenizer-model (type inferred)
  --batch_size, --batch_size_training -> --micro-batch-size
  --gradient_accumulation_steps -> --gradient-accumulation-steps
  --lr_min -> --min-lr                   --lr_warmup (fraction) -> --lr-warmup-fraction
  --clip_grad_norm -> --grad-clip-norm   --num_workers_dataloader -> --num-workers
  --context-size, --sequence_length -> --seq-length
  --save_checkpoint_path -> --save       --load_checkpoint_path -> --load
  --save_interval_iteration -> --save-interval   --val_data_path -> --valid-data-path
  --num_epochs, --lr_decay, --dataset    refused: epochs and jsonl datasets have no equivalent in
                                         iteration-based pretraining on Megatron .bin/.idx data
Megatron-LM names that differ from kotomamba's: --clip-grad (= --grad-clip-norm),
--wandb-exp-name (= --wandb-name); --use-torch-fsdp2 and --use-distributed-optimizer are accepted
and ignored (FSDP always shards). Megatron's model-shape and model-parallel flags are not accepted.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import math
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from kotomamba.checkpoint_layout import is_training_checkpoint
from kotomamba.errors import KotomambaError
from kotomamba.lr_schedule import LR_DECAY_STYLES, WSD_DECAY_STYLES
from kotomamba.presets import MODEL_PRESETS
from megatron_lm.tokenizer import TOKENIZER_TYPES

DEFAULT_MODEL = "130m"
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
CHECKPOINT_TYPES = ("SHARDED_STATE_DICT", "LOCAL_STATE_DICT", "FULL_STATE_DICT")
DTYPES = ("fp32", "bf16", "fp16")
SELECTIVE_SCAN_CHOICES = ("auto", "kotomamba", "kotomamba-deterministic", "mamba-ssm")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEFAULT_SPLIT = "969,30,1"
_BLEND_FORMAT = "one prefix, several prefixes, or WEIGHT PREFIX pairs (w1 p1 w2 p2 ...)"


class ArgumentError(KotomambaError, ValueError):
    """An invalid flag, value or combination; the message names the flag (or YAML key) and value."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own errors become ArgumentError too
        raise ArgumentError(message + self._suggestions(message))

    def _suggestions(self, message: str) -> str:
        """' (did you mean --lr-decay-style?)' for each unknown option, from every option string, aliases too."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        hints = []
        for token in message.removeprefix("unrecognized arguments: ").split():
            name = token.split("=", 1)[0]
            if not name.startswith("--"):
                continue
            close = difflib.get_close_matches(name.replace("_", "-"), known, n=2, cutoff=0.75)
            if close:
                hints.append(f"{name}: did you mean {' or '.join(close)}?")
        return f" ({'; '.join(hints)})" if hints else ""


class _IgnoredForCompatibility(argparse.Action):
    """A flag old scripts pass that has no effect here; parsed and dropped."""

    def __init__(self, option_strings, dest, nargs=0, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=nargs, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        pass


class _Refused(argparse.Action):
    """A flag old scripts pass whose effect kotomamba does not have; harmless values pass."""

    def __init__(self, option_strings, dest, reason: str, harmless: tuple[str, ...] = (), nargs=None, **kwargs):
        self.reason = reason
        self.harmless = harmless
        super().__init__(option_strings, argparse.SUPPRESS, nargs=nargs, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        self.check(values, option_string or self.option_strings[0])

    def check(self, value: Any, name: str) -> None:
        if self.nargs == 0 and value is False:
            return
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if self.nargs != 0 and str(value).strip().lower() in self.harmless:
            return
        shown = name if self.nargs == 0 else f"{name} {value}"
        raise ArgumentError(f"{shown}: {self.reason}")


def _token_count(text: str) -> int:
    """A whole number of tokens, written as an integer (200000000000) or in e-notation (200e9, 2.5e11)."""
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 200e9 or 200000000000)") from None
        if not math.isfinite(number) or number != int(number):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens") from None
        value = int(number)
    return value


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    """A case-insensitive choice that returns the canonical spelling (``wsd`` -> ``WSD``)."""
    canonical = {option.lower(): option for option in options}

    def convert(text: str) -> str:
        try:
            return canonical[text.strip().lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(options)}") from None

    convert.__name__ = "choice"
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The full parser; ``parse_args`` adds the YAML merge, validation and derived values."""
    parser = _Parser(
        prog="pretrain.py",
        description="Pretrain a Mamba language model with PyTorch FSDP on Megatron-LM .bin/.idx data.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml",
        help="YAML mapping of flag names (dashes or underscores, no leading --) to values, e.g. "
             "'lr: 3.0e-4' or 'data_path: [0.7, a_text_document, 0.3, b_text_document]'. Flags on the "
             "command line override the file; unknown keys are an error.",
    )
    ignore = _IgnoredForCompatibility

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=None, metavar="PRESET|CONFIG",
        help=f"Architecture to train from scratch: a preset ({', '.join(MODEL_PRESETS)}), a mamba-ssm "
             f"config.json, or a directory holding one. Default {DEFAULT_MODEL} when --base-model is not given.",
    )
    model.add_argument(
        "--base-model", "--model-name", default=None, metavar="DIR",
        help="Continual pretraining: a mamba-ssm / Hugging Face checkpoint directory (config.json plus "
             "weights); training starts from its weights. Alias --model_name (kotomamba llama-recipes).",
    )
    model.add_argument(
        "--from-scratch", action="store_true",
        help="With --base-model: use only its config.json (architecture) and initialize the weights randomly.",
    )
    model.add_argument(
        "--vocab-size", type=int, default=None,
        help="Vocabulary size for --tokenizer-type NullTokenizer (pre-tokenized data, no tokenizer files).",
    )
    model.add_argument("--mamba", action=ignore, help="Accepted for kotomamba scripts; the model is always Mamba.")
    model.add_argument(
        "--sliding-window-size", "--attention-dropout", "--hidden-dropout", action=ignore, nargs=1, metavar="VALUE",
        help="Accepted for kotomamba scripts; attention-only settings with no effect on Mamba.",
    )
    model.add_argument(
        "--use-better-transformer", action=ignore,
        help="Accepted for kotomamba scripts; a transformer-only kernel switch with no effect on Mamba.",
    )
    model.add_argument(
        "--make-vocab-size-divisible-by", action=_Refused, nargs=1, metavar="VALUE",
        reason="not supported: the embedding is padded by the model config's pad_vocab_size_multiple "
               "(a preset, --model config.json or --base-model config.json).",
        help="Refused: set pad_vocab_size_multiple in the model's config.json instead.",
    )
    model.add_argument(
        "--quantization", "--freeze-layers", action=_Refused, nargs=0,
        reason="not supported: kotomamba pretrains every parameter in full precision.",
        help="Refused (kotomamba's fine-tuning options); every parameter is trained.",
    )
    model.add_argument(
        "--num-freeze-layers", action=_Refused, nargs=1, metavar="VALUE", harmless=("0",),
        reason="not supported: kotomamba pretrains every layer.",
        help="Refused unless 0 (a kotomamba fine-tuning option); every layer is trained.",
    )

    tokenizer = parser.add_argument_group("tokenizer")
    tokenizer.add_argument(
        "--tokenizer-type", type=_choice(TOKENIZER_TYPES), default=None, metavar="{" + ",".join(TOKENIZER_TYPES) + "}",
        help="Megatron-LM tokenizer class. When omitted it is inferred from --tokenizer-model: a "
             "*.model file means SentencePieceTokenizer, anything else HuggingFaceTokenizer.",
    )
    tokenizer.add_argument(
        "--tokenizer-model", "--tokenizer-name", default=None, metavar="PATH",
        help="SentencePiece .model file, or a Hugging Face tokenizer directory / tokenizer.json. "
             "Alias --tokenizer_name (kotomamba llama-recipes).",
    )
    tokenizer.add_argument(
        "--vocab-file", "--merge-file", action=ignore, nargs=1, metavar="VALUE",
        help="Accepted for kotomamba scripts; GPT-2 BPE files, unused by the tokenizer types above.",
    )
    tokenizer.add_argument(
        "--vocab-extra-ids", action=_Refused, nargs=1, metavar="VALUE", harmless=("0",),
        reason="not supported: T5 span-masking tokens are not added to the vocabulary.",
        help="Refused unless 0: T5 span-masking tokens are not added to the vocabulary.",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-path", nargs="*", default=None, metavar="PATH",
        help=f"Megatron dataset prefix(es) (path without .bin/.idx): {_BLEND_FORMAT}. Split into "
             f"train/valid/test by --split. Exclusive with --train/valid/test-data-path.",
    )
    data.add_argument(
        "--split", default=None,
        help=f"Train,valid,test proportions of each --data-path dataset, e.g. 949,50,1 (normalized; "
             f"missing trailing values are 0). Default {DEFAULT_SPLIT}, like Megatron-LM.",
    )
    data.add_argument(
        "--train-data-path", nargs="*", default=None, metavar="PATH",
        help=f"Training dataset prefix(es), {_BLEND_FORMAT}; used whole (no --split).",
    )
    data.add_argument(
        "--valid-data-path", "--val-data-path", nargs="*", default=None, metavar="PATH",
        help=f"Validation dataset prefix(es), {_BLEND_FORMAT}. Alias --val_data_path (kotomamba llama-recipes).",
    )
    data.add_argument(
        "--test-data-path", nargs="*", default=None, metavar="PATH",
        help=f"Test dataset prefix(es), {_BLEND_FORMAT}.",
    )
    data.add_argument(
        "--data-schedule", default=None, metavar="FILE.yaml",
        help="Train on stages of data mixtures, one after another, in one run: a YAML list of stages, each "
             "a blend (weights and prefixes, as --data-path takes them) and a length in tokens, samples or "
             "iterations (see README, 'Long runs'). Instead of --data-path; --split applies to each dataset; "
             "the stages' lengths are the run's length (no --train-iters/--train-samples/--train-tokens).",
    )
    data.add_argument(
        "--data-cache-path", default=None, metavar="DIR",
        help="Directory for the cached sample-index files (default: next to each dataset prefix).",
    )
    data.add_argument(
        "--data-allow-extra-bin-bytes", action="store_true",
        help="Accept a .bin longer than its .idx says. By default the pair must match exactly, as "
             "Megatron-LM's writer makes it: a longer .bin usually belongs to another dataset. Megatron-LM "
             "itself reads such a pair without a check.",
    )
    data.add_argument(
        "--num-workers", "--num-workers-dataloader", type=int, default=2,
        help="DataLoader worker processes per rank (default 2).",
    )
    data.add_argument(
        "--seq-length", "--context-size", "--sequence-length", type=int, default=2048,
        help="Tokens per training sample (default 2048). Aliases --context-size, --sequence_length (kotomamba).",
    )
    data.add_argument(
        "--seed", type=int, default=1234,
        help="Random seed for weight initialization and the data order (default 1234, like Megatron-LM).",
    )
    data.add_argument(
        "--reset-state-at-eod", "--reset-attention-mask", action="store_true",
        help="Documents packed into one sample do not see each other: every Mamba layer starts each "
             "document (the token after an EOD) from a zero state, its convolution included. Mamba-1 "
             "layers need kotomamba's scan on a GPU (--selective-scan auto or kotomamba); models with "
             "attention layers are refused (mamba-ssm's attention has no per-document mask). Megatron's "
             "--reset-attention-mask means the same here.",
    )
    data.add_argument(
        "--eod-mask-loss", action="store_true",
        help="No loss on predicting the token after an EOD (Megatron's meaning): the first token of a "
             "document is not predicted from the document before. The loss is the mean over the "
             "remaining target tokens of the global batch.",
    )
    data.add_argument(
        "--reset-position-ids", "--retro-return-doc-ids", action=ignore,
        help="Accepted for kotomamba scripts; Mamba has no position ids.",
    )
    data.add_argument(
        "--short-seq-prob", action=ignore, nargs=1, metavar="VALUE",
        help="Accepted for kotomamba scripts; a BERT-dataset option with no effect here.",
    )
    data.add_argument(
        "--dataset", action=_Refused, nargs=1, metavar="VALUE",
        reason="not supported (kotomamba llama-recipes jsonl datasets): preprocess the data with "
               "megatron_lm/tools/preprocess_data.py and pass the prefix with --data-path.",
        help="Refused; use --data-path with Megatron .bin/.idx data.",
    )

    batch = parser.add_argument_group("batch size and training length")
    batch.add_argument(
        "--micro-batch-size", "--batch-size", "--batch-size-training", type=int, default=1,
        help="Samples per rank per forward/backward pass (default 1). Aliases --batch_size, "
             "--batch_size_training (kotomamba llama-recipes).",
    )
    batch.add_argument(
        "--global-batch-size", type=int, default=None,
        help="Samples per optimizer step over all ranks; a multiple of --micro-batch-size × "
             "data-parallel size, the quotient being the gradient-accumulation steps. Default: "
             "--micro-batch-size × data-parallel size (no accumulation).",
    )
    batch.add_argument(
        "--gradient-accumulation-steps", type=int, default=None,
        help="Instead of --global-batch-size (kotomamba llama-recipes): global batch = micro batch × "
             "this × data-parallel size.",
    )
    batch.add_argument(
        "--train-iters", type=int, default=None,
        help="Optimizer steps to train in total, counting resumed runs. Exclusive with --train-samples and "
             "--train-tokens.",
    )
    batch.add_argument(
        "--train-samples", type=int, default=None,
        help="Samples to train on in total; becomes --train-iters = train-samples // global batch, and "
             "the learning-rate schedule is then given with the --lr-*-samples flags.",
    )
    batch.add_argument(
        "--train-tokens", type=_token_count, default=None, metavar="TOKENS",
        help="Tokens to train on in total, e.g. 200e9; becomes --train-iters = the fewest iterations of "
             "global batch × --seq-length tokens that reach it (the last one may pass it by less than an "
             "iteration). The learning-rate schedule is then given with the --lr-*-iters flags.",
    )
    batch.add_argument(
        "--num-epochs", action=_Refused, nargs=1, metavar="VALUE",
        reason="not supported (kotomamba llama-recipes): give the training length with --train-iters, "
               "--train-samples or --train-tokens.",
        help="Refused; use --train-iters, --train-samples or --train-tokens.",
    )

    optimizer = parser.add_argument_group("optimizer and learning-rate schedule")
    optimizer.add_argument("--lr", type=float, default=None, help="Peak learning rate, reached after warmup (required).")
    optimizer.add_argument(
        "--min-lr", "--lr-min", type=float, default=0.0,
        help="Learning rate at the end of the decay, kept afterwards (default 0). Alias --lr_min (kotomamba).",
    )
    optimizer.add_argument(
        "--lr-decay-style", type=_choice(LR_DECAY_STYLES), default="linear",
        metavar="{" + ",".join(LR_DECAY_STYLES) + "}",
        help="Shape of the decay from --lr to --min-lr after warmup, as in Megatron-LM (default linear; "
             "case-insensitive). WSD holds --lr, then anneals over the last --lr-wsd-decay-iters.",
    )
    optimizer.add_argument(
        "--lr-decay-iters", type=int, default=None,
        help="Iteration at which the decay reaches --min-lr (default --train-iters).",
    )
    optimizer.add_argument(
        "--lr-decay-samples", type=int, default=None,
        help="With --train-samples: samples over which the decay runs (default --train-samples).",
    )
    optimizer.add_argument(
        "--lr-warmup-iters", type=int, default=None,
        help="Iterations of linear warmup from --lr-warmup-init to --lr (default 0).",
    )
    optimizer.add_argument(
        "--lr-warmup-fraction", "--lr-warmup", type=float, default=None,
        help="Warmup as a fraction of --lr-decay-iters, instead of --lr-warmup-iters/--lr-warmup-samples. "
             "Alias --lr_warmup (kotomamba llama-recipes' fraction of the run).",
    )
    optimizer.add_argument(
        "--lr-warmup-samples", type=int, default=None,
        help="With --train-samples: samples of linear warmup (default 0).",
    )
    optimizer.add_argument(
        "--lr-warmup-init", type=float, default=0.0,
        help="Learning rate at the start of warmup (default 0).",
    )
    optimizer.add_argument(
        "--lr-wsd-decay-style", type=_choice(WSD_DECAY_STYLES), default="exponential",
        metavar="{" + ",".join(WSD_DECAY_STYLES) + "}",
        help="Shape of the final anneal of --lr-decay-style WSD (default exponential, like Megatron-LM).",
    )
    optimizer.add_argument(
        "--lr-wsd-decay-iters", type=int, default=None,
        help="Length in iterations of the WSD anneal, ending at --lr-decay-iters (required for WSD).",
    )
    optimizer.add_argument(
        "--lr-wsd-decay-samples", type=int, default=None,
        help="With --train-samples: length in samples of the WSD anneal.",
    )
    optimizer.add_argument(
        "--lr-decay", action=_Refused, nargs=1, metavar="VALUE",
        reason="not supported (kotomamba llama-recipes' fraction of the run): give --lr-decay-iters "
               "(that fraction × --train-iters) instead.",
        help="Refused; use --lr-decay-iters.",
    )
    optimizer.add_argument(
        "--adam-beta1", type=float, default=0.9, help="AdamW first-moment coefficient (default 0.9)."
    )
    optimizer.add_argument(
        "--adam-beta2", type=float, default=0.95,
        help="AdamW second-moment coefficient (default 0.95, kotomamba's; Megatron-LM's is 0.999).",
    )
    optimizer.add_argument(
        "--adam-eps", type=float, default=1e-6,
        help="AdamW denominator epsilon (default 1e-6, kotomamba's; Megatron-LM's is 1e-8).",
    )
    optimizer.add_argument(
        "--weight-decay", type=float, default=0.01,
        help="AdamW decoupled weight decay (default 0.01); not applied to biases, norms and SSM A/D.",
    )
    optimizer.add_argument(
        "--grad-clip-norm", "--clip-grad", "--clip-grad-norm", type=float, default=1.0,
        help="Clip the global gradient L2 norm to this value; 0 disables (default 1.0). Alias --clip-grad (Megatron-LM).",
    )
    optimizer.add_argument(
        "--optimizer", action=_Refused, nargs=1, metavar="VALUE", harmless=("adam", "adamw"),
        reason="not supported: kotomamba trains with AdamW (--optimizer adam).",
        help="Accepted as adam (AdamW, the only optimizer); anything else is refused.",
    )

    precision = parser.add_argument_group("precision")
    exclusive = precision.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--bf16", "--pure-bf16", "--use-bf16", dest="precision", action="store_const", const="bf16",
        help="bf16 compute with fp32 master weights. Default (neither flag): bf16 where the GPU "
             "supports it, else fp32. Aliases --pure_bf16, --use_bf16 (kotomamba llama-recipes).",
    )
    exclusive.add_argument(
        "--fp16", "--use-fp16", dest="precision", action="store_const", const="fp16",
        help="fp16 compute with fp32 master weights and dynamic loss scaling (V100). Alias --use_fp16.",
    )
    exclusive.add_argument(
        "--fp32", "--use-fp32", dest="precision", action="store_const", const="fp32",
        help="Everything in fp32. Alias --use_fp32.",
    )
    parser.set_defaults(precision="auto")
    precision.add_argument(
        "--param-dtype", type=_choice(DTYPES), default=None, metavar="{fp32,bf16,fp16}",
        help="dtype FSDP gathers parameters in for compute (default: set by the precision flag).",
    )
    precision.add_argument(
        "--reduce-dtype", type=_choice(DTYPES), default=None, metavar="{fp32,bf16,fp16}",
        help="dtype of the gradient reduce-scatter (default: fp32 under bf16/fp32, fp16 under --fp16). "
             "kotomamba's --mixed-precision reduced in bf16: add --reduce-dtype bf16 to match.",
    )
    precision.add_argument(
        "--mixed-precision", action=ignore,
        help="Accepted for kotomamba scripts; mixed precision is on whenever --bf16/--fp16 is.",
    )
    precision.add_argument(
        "--initial-loss-scale", type=float, default=2.0 ** 32,
        help="fp16: starting dynamic loss scale (default 2**32, like Megatron-LM).",
    )
    precision.add_argument(
        "--min-loss-scale", type=float, default=1.0, help="fp16: the loss scale never drops below this (default 1)."
    )
    precision.add_argument(
        "--loss-scale-window", type=int, default=1000,
        help="fp16: overflow-free iterations before the loss scale doubles (default 1000).",
    )
    precision.add_argument(
        "--hysteresis", type=int, default=2,
        help="fp16: overflows tolerated before the loss scale is halved (default 2).",
    )

    kernels = parser.add_argument_group("kernels")
    kernels.add_argument(
        "--selective-scan", type=_choice(SELECTIVE_SCAN_CHOICES), default="auto",
        metavar="{" + ",".join(SELECTIVE_SCAN_CHOICES) + "}",
        help="Mamba-1's selective scan: kotomamba's Triton kernel (on an H100 1.12x mamba-ssm's speed from "
             "65,536 channels per layer call, micro batch x d_inner: 1.4b and 2.8b at micro batch 16; 0.96-1.01x "
             "at most smaller shapes, 0.5-0.8x for small models; about 10 GB less memory at 2.8b; see "
             "docs/benchmarks.md), the same with a bitwise deterministic backward (kotomamba-deterministic: "
             "no atomic adds, about 10%% slower, more memory), mamba-ssm's CUDA kernel, or auto (default): ours "
             "for the calls of the sizes it was measured faster on, on the GPUs it was measured on (H100), "
             "mamba-ssm's for the others. The training log's setup line says which one runs.",
    )

    fsdp = parser.add_argument_group("FSDP")
    fsdp.add_argument(
        "--sharding-strategy", type=_choice(SHARDING_STRATEGIES), default="FULL_SHARD",
        metavar="{" + ",".join(SHARDING_STRATEGIES) + "}",
        help="FULL_SHARD shards parameters, gradients and optimizer state (ZeRO-3); SHARD_GRAD_OP keeps "
             "parameters gathered between forward and backward (ZeRO-2); NO_SHARD is plain data "
             "parallelism; HYBRID_SHARD shards within a node and replicates across nodes (default FULL_SHARD).",
    )
    fsdp.add_argument(
        "--fsdp-activation-checkpointing", action="store_true",
        help="Recompute each Mamba block's activations in backward, trading compute for memory.",
    )
    fsdp.add_argument(
        "--activation-checkpointing-layers", type=int, default=None, metavar="N",
        help="Recompute only the first N Mamba blocks in backward (implies --fsdp-activation-checkpointing); "
             "the other blocks keep their activations. Between no checkpointing and full: spend the memory "
             "left over on less recomputation. Default: every block when checkpointing is on.",
    )
    fsdp.add_argument(
        "--cross-entropy-chunk-tokens", type=int, default=0, metavar="N",
        help="Compute the output layer and the loss N tokens at a time, so the full batch × sequence × "
             "vocabulary logits (and their fp32 copy and gradient) never exist at once: saves memory for "
             "larger micro-batches or sequences at the cost of recomputing the output layer in backward. "
             "Same loss and gradients. Default 0: from the full logits.",
    )
    fsdp.add_argument(
        "--fsdp-blocks-per-unit", type=int, default=1, metavar="N",
        help="Shard N consecutive Blocks as one FSDP unit (default 1): fewer, larger all-gathers and "
             "reduce-scatters and fewer hooks per step (small or launch-bound models: each unit costs host "
             "time), at the price of N Blocks' parameters gathered at once.",
    )
    fsdp.add_argument(
        "--fsdp-cpu-offload", action="store_true",
        help="Keep sharded parameters (and optimizer state) in CPU memory between uses.",
    )
    fsdp.add_argument(
        "--low-cpu-fsdp", action="store_true",
        help="Build the model on the meta device and materialize only each rank's shard, so host "
             "memory does not hold a full copy per rank.",
    )
    fsdp.add_argument(
        "--use-mpi", action="store_true",
        help="Take rank, world size and local rank from Open MPI's OMPI_COMM_WORLD_* variables "
             "(launch with mpirun instead of torchrun); MASTER_ADDR/MASTER_PORT must be set.",
    )
    fsdp.add_argument(
        "--enable-fsdp", "--fsdp", "--use-torch-fsdp2", "--use-distributed-optimizer", action=ignore,
        help="Accepted for kotomamba / Megatron-LM scripts; FSDP (sharded parameters, gradients and "
             "optimizer state, see --sharding-strategy) is always on."
    )

    logging = parser.add_argument_group("evaluation and logging")
    logging.add_argument(
        "--eval-interval", type=int, default=100,
        help="Evaluate on the validation split every this many iterations (default 100).",
    )
    logging.add_argument(
        "--eval-iters", type=int, default=10,
        help="Global batches per evaluation; 0 disables evaluation (default 10).",
    )
    logging.add_argument(
        "--log-interval", type=int, default=1,
        help="Print and log loss, learning rate, throughput and MFU every this many iterations (default 1).",
    )
    logging.add_argument("--wandb-entity", default=None, help="Weights & Biases entity (team or user).")
    logging.add_argument("--wandb-project", default=None, help="Weights & Biases project; logging to W&B is on when set.")
    logging.add_argument(
        "--wandb-name", "--wandb-exp-name", default=None,
        help="Weights & Biases run name. Alias --wandb-exp-name (Megatron-LM).",
    )
    logging.add_argument("--tensorboard-dir", default=None, metavar="DIR", help="Write TensorBoard event files here.")
    logging.add_argument(
        "--optimizer-stats-interval", type=int, default=0,
        help="Log optimizer statistics (gradient and parameter norms per parameter group) every this many "
             "iterations; 0 disables (default 0).",
    )
    logging.add_argument(
        "--skip-batch", nargs="*", type=int, default=None, metavar="FIRST LAST",
        help="Iteration ranges to skip without an optimizer step, as FIRST LAST pairs (inclusive), e.g. "
             "'--skip-batch 1200 1210 5000 5000' to step over a loss spike when resuming.",
    )
    logging.add_argument(
        "--log-loss-per-dataset", action="store_true",
        help="With a blend of datasets (--data-path W1 P1 W2 P2 ..., or --data-schedule), also log the "
             "training loss of each dataset over each --log-interval (train/<name>/loss and perplexity), "
             "from the same forward passes: each sample knows its dataset. Validation always reports each "
             "dataset's loss.",
    )
    logging.add_argument(
        "--max-consecutive-skips", type=int, default=10,
        help="Stop with an error after this many consecutive iterations were skipped because the loss or "
             "gradients were not finite; 0 means no limit (default 10). fp16 gradient overflows while the "
             "loss scale can still come down (above --min-loss-scale) are the scaler calibrating and do not count.",
    )
    logging.add_argument(
        "--run-validation", action=ignore,
        help="Accepted for kotomamba scripts; validation runs whenever --eval-iters > 0.",
    )

    checkpoint = parser.add_argument_group("checkpointing")
    checkpoint.add_argument(
        "--save", "--save-checkpoint-path", default=None, metavar="DIR",
        help="Directory to save checkpoints (model, optimizer, scheduler, data position) to; none when unset.",
    )
    checkpoint.add_argument(
        "--load", "--load-checkpoint-path", default=None, metavar="DIR",
        help="Resume from the latest checkpoint in this directory when it holds one.",
    )
    checkpoint.add_argument(
        "--save-interval", "--save-interval-iteration", type=int, default=500,
        help="Save a checkpoint every this many iterations (default 500).",
    )
    checkpoint.add_argument(
        "--checkpoint-type", type=_choice(CHECKPOINT_TYPES), default="SHARDED_STATE_DICT",
        metavar="{" + ",".join(CHECKPOINT_TYPES) + "}",
        help="SHARDED_STATE_DICT: every rank writes its shards in parallel (torch.distributed.checkpoint), "
             "resumable on another number of processes (default); LOCAL_STATE_DICT: accepted for kotomamba "
             "scripts, the same sharded format; FULL_STATE_DICT: rank 0 writes one consolidated file.",
    )
    checkpoint.add_argument("--async-save", action="store_true", help="Write checkpoints in the background while training continues.")
    checkpoint.add_argument(
        "--keep-last-k", type=int, default=None, help="Delete older checkpoints, keeping the newest K (default: keep all)."
    )
    checkpoint.add_argument(
        "--exit-interval", type=int, default=None, help="Save (when --save is set) and exit at the first iteration divisible by this."
    )
    checkpoint.add_argument(
        "--exit-duration-in-mins", type=float, default=None,
        help="Save (when --save is set) and exit once training has run this many minutes.",
    )
    checkpoint.add_argument(
        "--override-data-on-resume", action="store_true",
        help="Resume even though the training data changed since the checkpoint (other --data-path/--split/"
             "--seed, --seq-length, tokenizer or data files): training continues at the checkpoint's consumed "
             "samples in the new data order. Without it such a resume is refused.",
    )
    checkpoint.add_argument(
        "--save-model", "--save-optimizer", action=ignore,
        help="Accepted for kotomamba scripts; checkpoints always hold the model and optimizer.",
    )

    misc = parser.add_argument_group("miscellaneous")
    misc.add_argument(
        "--dry-run", action="store_true",
        help="Print the resolved configuration, world layout, batch arithmetic, token budget, parameter "
             "count, FLOPs per token and a per-GPU memory estimate, then exit, without a GPU, distributed "
             "initialization or data files (a login node is fine); --lr, --train-iters/--train-samples and "
             "the data paths may then be omitted. The world size comes from torchrun's or mpirun's "
             "environment when present, else from --dry-run-world-size.",
    )
    misc.add_argument(
        "--dry-run-world-size", type=int, default=None, metavar="N",
        help="With --dry-run outside a launcher: the number of processes (GPUs) the real run will have, "
             "e.g. 32 for 4 nodes x 8 GPUs (default 1). torchrun's WORLD_SIZE or mpirun's "
             "OMPI_COMM_WORLD_SIZE take precedence.",
    )
    misc.add_argument(
        "--dry-run-gpus-per-node", type=int, default=None, metavar="N",
        help="With --dry-run outside a launcher: processes per node (8 on ABCI A-nodes, 4 on V-nodes); "
             "sets the node count and the HYBRID_SHARD group (default: the world size when at most 8, "
             "else the largest of 8, 4, 2 that divides it). LOCAL_WORLD_SIZE / OMPI_COMM_WORLD_LOCAL_SIZE "
             "take precedence.",
    )
    misc.add_argument(
        "--peak-tflops", type=float, default=None,
        help="Peak dense TFLOP/s of one accelerator for the MFU figure (default: looked up from the device name).",
    )
    _list_legacy_flags_last(parser)
    return parser


USAGE = """pretrain.py --model PRESET|CONFIG --tokenizer-model PATH --data-path [WEIGHT] PREFIX [...]
                   --micro-batch-size N --global-batch-size N --train-iters N --lr LR [--min-lr LR]
                   [--bf16 | --fp16 | --fp32] [--save DIR] [--load DIR] [--dry-run] [more options below]"""


class _HelpFormatter(argparse.HelpFormatter):
    """Each option under its first (canonical) name; the aliases are listed once, in the last group."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or not action.option_strings[0].startswith("--"):  # positionals, -h/--help
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return action.option_strings[0]
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def _list_legacy_flags_last(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM / kotomamba compatibility flags and aliases leave their groups for one final group."""
    legacy, aliases = [], []
    for action in parser._actions:
        if isinstance(action, (_IgnoredForCompatibility, _Refused)):
            legacy.append(f"{', '.join(action.option_strings)}: {action.help}")
            action.help = argparse.SUPPRESS
        elif len(action.option_strings) > 1 and action.option_strings[0].startswith("--"):
            aliases.append(f"{', '.join(action.option_strings[1:])} = {action.option_strings[0]}")
    wrap = functools.partial(textwrap.fill, width=100, subsequent_indent="    ", break_on_hyphens=False)
    text = "\n".join([
        wrap("Aliases (the same option under the name another tool uses; underscores work for dashes "
             "everywhere): " + "; ".join(aliases) + "."),
        "", "Legacy flags, accepted so that Megatron-LM and kotomamba scripts run unchanged:",
        *(wrap(line, initial_indent="  ") for line in legacy)])
    parser.add_argument_group("aliases and legacy flags", text)
    parser.usage = USAGE
    parser.formatter_class = _LegacyAwareFormatter


class _LegacyAwareFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the legacy group's one-flag-per-line layout (RawDescription) with canonical-name invocations."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``), merge ``--config``, validate, derive; raises ArgumentError."""
    argv = _dashed_option_names(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    config_finder = _Parser(add_help=False, allow_abbrev=False)
    config_finder.add_argument("--config")
    config_path = config_finder.parse_known_args(argv)[0].config
    if config_path is not None:
        parser.set_defaults(**_defaults_from_config(parser, config_path))
    args = parser.parse_args(argv)
    _validate_and_derive(args)
    return args


def parse_blend(values: Sequence[str], flag: str) -> tuple[list[str], list[float] | None]:
    """Split a --*-data-path list into prefixes and weights (None when unweighted)."""
    values = list(values)
    if not values:
        raise ArgumentError(f"{flag} needs at least one dataset prefix")
    if _is_number(values[0]) and len(values) > 1:
        if len(values) % 2:
            raise ArgumentError(
                f"{flag} has {len(values)} values starting with the weight {values[0]!r}: a weighted list needs "
                f"WEIGHT PREFIX pairs (an even count), e.g. 0.7 a_text_document 0.3 b_text_document"
            )
        weights, paths = values[0::2], values[1::2]
        for position, weight in enumerate(weights):
            if not _is_number(weight):
                raise ArgumentError(
                    f"{flag}: weight {position + 1} is {weight!r}, not a number (values must alternate WEIGHT PREFIX)"
                )
            if not 0 <= float(weight) < math.inf:
                raise ArgumentError(f"{flag}: weight {weight!r} must be a finite number >= 0")
        if sum(float(weight) for weight in weights) <= 0:
            raise ArgumentError(f"{flag}: the weights {' '.join(weights)} sum to 0")
        parsed_weights: list[float] | None = [float(weight) for weight in weights]
    else:
        paths, parsed_weights = values, None
    for path in paths:
        if _is_number(path):
            raise ArgumentError(
                f"{flag}: {path!r} looks like a weight where a dataset prefix belongs; give one prefix, "
                f"several prefixes, or WEIGHT PREFIX pairs starting with a weight"
            )
        if path.endswith((".bin", ".idx")):
            raise ArgumentError(f"{flag}: {path!r} names a file; pass the prefix without .bin/.idx: {path[:-4]!r}")
    return paths, parsed_weights


def parse_split(split: str) -> list[float]:
    """Megatron's --split string (``969,30,1``, ``90/5/5``, ``100``) as normalized proportions."""
    parts = [part.strip() for part in re.split(r"[,/]", split)]
    if not 1 <= len(parts) <= 3 or not all(_is_number(part) for part in parts):
        raise ArgumentError(f"--split {split!r} must be 1 to 3 numbers separated by commas, e.g. 969,30,1")
    numbers = [float(part) for part in parts] + [0.0] * (3 - len(parts))
    if any(not 0 <= number < math.inf for number in numbers) or sum(numbers) <= 0:
        raise ArgumentError(f"--split {split!r} must be finite numbers >= 0 with a positive sum")
    if numbers[0] == 0:
        raise ArgumentError(f"--split {split!r} leaves nothing for training (its first value is 0)")
    return [number / sum(numbers) for number in numbers]


def _is_number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _dashed_option_names(argv: list[str]) -> list[str]:
    """``--wandb_name=x`` -> ``--wandb-name=x``: kotomamba's scripts used both spellings."""
    spelled = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token.partition("=")
            token = name.replace("_", "-") + equals + value
        spelled.append(token)
    return spelled


# ----------------------------------------------------------------------------- YAML config

def read_yaml_file(path: str, flag: str) -> Any:
    """The YAML document a flag names; ArgumentError naming the flag and the file when it cannot be read or parsed."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ArgumentError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ArgumentError(f"{flag} {path}: not valid YAML: {error}") from None


def _defaults_from_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    data = read_yaml_file(path, "--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {path}: must be a mapping of flag names to values, got {type(data).__name__}")

    by_option = {option: action for action in parser._actions for option in action.option_strings}
    by_dest = {action.dest: action for action in parser._actions if action.dest != argparse.SUPPRESS}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).strip().lstrip("-")
        if name == "precision":  # the dest of --bf16/--fp16/--fp32
            _check(value in PRECISIONS, f"--config {path}: key 'precision' must be one of {', '.join(PRECISIONS)}, "
                                        f"got {value!r}")
            defaults["precision"] = value
            continue
        action = by_option.get("--" + name.replace("_", "-")) or by_dest.get(name.replace("-", "_"))
        if action is None or action.dest in ("config", "help"):
            known = [option[2:] for option in by_option if option.startswith("--")]
            hint = difflib.get_close_matches(name.replace("_", "-"), known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ArgumentError(f"--config {path}: unknown key {str(key)!r}, not a pretrain.py flag{suggestion}")
        defaults.update(_config_entry(action, value, f"--config {path}: key {str(key)!r}"))
    return defaults


def _config_entry(action: argparse.Action, value: Any, where: str) -> dict[str, Any]:
    """The parser default(s) one YAML entry sets, converted and checked like the command-line flag."""
    if isinstance(action, _IgnoredForCompatibility):
        return {}
    if isinstance(action, _Refused):
        action.check(value, where)
        return {}
    if action.nargs == 0:  # store_true / store_const flags
        if not isinstance(value, bool):
            raise ArgumentError(f"{where}: expected true or false, got {value!r}")
        if isinstance(action.const, str):  # --bf16/--fp16/--fp32 store their name in 'precision'
            return {action.dest: action.const} if value else {}
        return {action.dest: value}
    if value is None:
        return {action.dest: None}
    if action.nargs == "*":
        if isinstance(value, str):
            items = value.split()
        elif isinstance(value, list):
            # skip_batch may be written as a list of [first, last] pairs
            items = [item for entry in value for item in (entry if isinstance(entry, list) else [entry])]
        else:
            items = [value]
        return {action.dest: [_config_scalar(action, item, where) for item in items]}
    return {action.dest: _config_scalar(action, value, where)}


def _config_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (bool, list, dict)):
        raise ArgumentError(f"{where}: expected a single value, got {value!r}")
    if action.type is None:
        return str(value)
    try:
        # through str so that YAML's 1e-4 (a string to YAML 1.1) and 2048 both convert like the CLI
        return action.type(str(value))
    except argparse.ArgumentTypeError as error:
        raise ArgumentError(f"{where}: {error}") from None
    except ValueError:
        raise ArgumentError(f"{where}: {value!r} is not a valid {action.type.__name__}") from None


# ----------------------------------------------------------------------------- validation

def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def _validate_and_derive(args: argparse.Namespace) -> None:
    _validate_numbers(args)
    _validate_model(args)
    _validate_tokenizer(args)
    _validate_data(args)
    _validate_precision(args)
    _validate_schedule_flags(args)
    _validate_checkpointing(args)
    args.skip_batch = _skip_ranges(args.skip_batch)
    if args.activation_checkpointing_layers:
        args.fsdp_activation_checkpointing = True


def _validate_numbers(args: argparse.Namespace) -> None:
    at_least = {
        "--micro-batch-size": (args.micro_batch_size, 1), "--global-batch-size": (args.global_batch_size, 1),
        "--gradient-accumulation-steps": (args.gradient_accumulation_steps, 1),
        "--train-iters": (args.train_iters, 1), "--train-samples": (args.train_samples, 1),
        "--train-tokens": (args.train_tokens, 1),
        "--seq-length": (args.seq_length, 1), "--num-workers": (args.num_workers, 0),
        "--vocab-size": (args.vocab_size, 1), "--seed": (args.seed, 0),
        "--lr-decay-iters": (args.lr_decay_iters, 1), "--lr-decay-samples": (args.lr_decay_samples, 1),
        "--lr-warmup-iters": (args.lr_warmup_iters, 0), "--lr-warmup-samples": (args.lr_warmup_samples, 0),
        "--lr-wsd-decay-iters": (args.lr_wsd_decay_iters, 1), "--lr-wsd-decay-samples": (args.lr_wsd_decay_samples, 1),
        "--loss-scale-window": (args.loss_scale_window, 1), "--hysteresis": (args.hysteresis, 1),
        "--eval-interval": (args.eval_interval, 1), "--eval-iters": (args.eval_iters, 0),
        "--log-interval": (args.log_interval, 1), "--optimizer-stats-interval": (args.optimizer_stats_interval, 0),
        "--max-consecutive-skips": (args.max_consecutive_skips, 0),
        "--cross-entropy-chunk-tokens": (args.cross_entropy_chunk_tokens, 0),
        "--activation-checkpointing-layers": (args.activation_checkpointing_layers, 1), "--save-interval": (args.save_interval, 1),
        "--fsdp-blocks-per-unit": (args.fsdp_blocks_per_unit, 1),
        "--keep-last-k": (args.keep_last_k, 1), "--exit-interval": (args.exit_interval, 1),
        "--dry-run-world-size": (args.dry_run_world_size, 1), "--dry-run-gpus-per-node": (args.dry_run_gpus_per_node, 1),
    }
    for flag, (value, minimum) in at_least.items():
        _check(value is None or value >= minimum, f"{flag} must be at least {minimum}, got {value}")
    _check(args.seed < 2 ** 32, f"--seed must be below 2**32, got {args.seed}")
    for flag, value in (("--dry-run-world-size", args.dry_run_world_size),
                        ("--dry-run-gpus-per-node", args.dry_run_gpus_per_node)):
        _check(value is None or args.dry_run, f"{flag} {value} only applies with --dry-run")

    non_negative = {
        "--lr": args.lr, "--min-lr": args.min_lr, "--lr-warmup-init": args.lr_warmup_init,
        "--weight-decay": args.weight_decay, "--grad-clip-norm": args.grad_clip_norm,
    }
    for flag, value in non_negative.items():
        _check(value is None or 0 <= value < math.inf, f"{flag} must be a finite number >= 0, got {value}")
    positive = {
        "--adam-eps": args.adam_eps, "--initial-loss-scale": args.initial_loss_scale,
        "--min-loss-scale": args.min_loss_scale, "--peak-tflops": args.peak_tflops,
        "--exit-duration-in-mins": args.exit_duration_in_mins,
    }
    for flag, value in positive.items():
        _check(value is None or 0 < value < math.inf, f"{flag} must be a finite number > 0, got {value}")
    for flag, value in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        _check(0 <= value < 1, f"{flag} must be in [0, 1), got {value}")
    _check(
        args.min_loss_scale <= args.initial_loss_scale,
        f"--min-loss-scale {args.min_loss_scale} is above --initial-loss-scale {args.initial_loss_scale}",
    )
    if args.lr is not None:
        _check(args.lr >= args.min_lr, f"--lr {args.lr} is below --min-lr {args.min_lr}")
    elif not args.dry_run:
        raise ArgumentError("--lr is required (the peak learning rate), e.g. --lr 3e-4")


def _validate_model(args: argparse.Namespace) -> None:
    if args.base_model is not None:
        _check(
            args.model is None,
            f"--model {args.model} and --base-model {args.base_model} both choose the architecture; "
            f"drop --model (add --from-scratch to use only the base model's config)",
        )
        base = Path(args.base_model)
        _check(base.is_dir(), f"--base-model {args.base_model}: no such directory")
        _check(not is_training_checkpoint(base),
               f"--base-model {args.base_model} is a kotomamba training checkpoint: continue that run with --load "
               f"{args.base_model}, or start a new one from its weights after `python -m kotomamba.convert "
               f"{args.base_model} OUT --format mamba-ssm` with --base-model OUT")
        _check((base / "config.json").is_file(), f"--base-model {args.base_model}: it holds no config.json")
        return
    _check(
        not args.from_scratch,
        "--from-scratch needs --base-model (it keeps the base model's config and drops its weights); "
        "to train a preset from scratch just pass --model",
    )
    if args.model is None:
        args.model = DEFAULT_MODEL
    if args.model.lower() in MODEL_PRESETS:
        args.model = args.model.lower()
        return
    path = Path(args.model)
    if path.is_dir():
        _check((path / "config.json").is_file(), f"--model {args.model}: the directory holds no config.json")
    else:
        _check(
            path.is_file(),
            f"--model {args.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing "
            f"config.json or directory",
        )


def _validate_tokenizer(args: argparse.Namespace) -> None:
    if args.tokenizer_type is None:
        _check(
            args.tokenizer_model is not None,
            f"--tokenizer-type is required (one of {', '.join(TOKENIZER_TYPES)}), or give --tokenizer-model",
        )
        is_sentencepiece = args.tokenizer_model.endswith(".model")
        args.tokenizer_type = "SentencePieceTokenizer" if is_sentencepiece else "HuggingFaceTokenizer"
    if args.tokenizer_type == "NullTokenizer":
        _check(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    else:
        _check(args.tokenizer_model is not None, f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
        _check(
            args.vocab_size is None,
            f"--vocab-size {args.vocab_size} only applies to --tokenizer-type NullTokenizer; "
            f"{args.tokenizer_type} takes its vocabulary from --tokenizer-model",
        )


def _validate_data(args: argparse.Namespace) -> None:
    per_split = {
        "--train-data-path": args.train_data_path, "--valid-data-path": args.valid_data_path,
        "--test-data-path": args.test_data_path,
    }
    given = [flag for flag, value in per_split.items() if value is not None]
    if args.data_schedule is not None:
        _check(args.data_path is None and not given,
               f"--data-schedule and {', '.join(['--data-path'] * (args.data_path is not None) + given)} are "
               f"exclusive: the schedule's stages name the datasets (--split still applies to each)")
        lengths = [flag for flag, value in (("--train-iters", args.train_iters), ("--train-samples", args.train_samples),
                                            ("--train-tokens", args.train_tokens)) if value is not None]
        _check(not lengths, f"--data-schedule sets the run's length (the sum of its stages): drop {', '.join(lengths)}")
        if args.split is None:
            args.split = DEFAULT_SPLIT
        parse_split(args.split)
        return
    if args.data_path is not None:
        _check(not given, f"--data-path and {', '.join(given)} are exclusive: use --data-path with --split, "
                          f"or per-split paths")
        parse_blend(args.data_path, "--data-path")
        if args.split is None:
            args.split = DEFAULT_SPLIT
        parse_split(args.split)
        return
    _check(args.split is None, f"--split {args.split} only applies to --data-path; per-split paths are used whole")
    if not given:
        _check(args.dry_run, "no training data: give --data-path (split by --split), --train-data-path or --data-schedule")
        return
    _check(args.train_data_path is not None, f"{', '.join(given)} given without --train-data-path")
    for flag, value in per_split.items():
        if value is not None:
            parse_blend(value, flag)


def check_data_files(data: Any) -> None:
    """Every dataset prefix of the data flags, and of the --data-schedule's stages (`data`: the run
    configuration's data section, kotomamba.config.DataSection, which imports this module), names an existing PREFIX.bin and PREFIX.idx (Megatron's pair)."""
    flags = {"--data-path": data.data_path, "--train-data-path": data.train_data_path,
             "--valid-data-path": data.valid_data_path, "--test-data-path": data.test_data_path}
    prefixes = [(flag, prefix) for flag, values in flags.items() if values is not None
                for prefix in parse_blend(values, flag)[0]]
    prefixes += [(f"--data-schedule {data.data_schedule}: stage {stage.name}:", prefix)
                 for stage in data.stages or () for prefix in stage.prefixes]
    for flag, prefix in prefixes:
        missing = [f"{prefix}{suffix}" for suffix in (".bin", ".idx") if not Path(f"{prefix}{suffix}").is_file()]
        if missing:
            raise ArgumentError(
                f"{flag} {prefix}: {' and '.join(missing)} not found (a dataset prefix names the PREFIX.bin and "
                f"PREFIX.idx that megatron_lm/tools/preprocess_data.py writes, without the extension)")


def _validate_precision(args: argparse.Namespace) -> None:
    # bf16 and fp16 never mix: each half type only goes with its own precision flag (or auto -> bf16)
    allowed_half = {"bf16": "bf16", "fp16": "fp16", "fp32": None, "auto": "bf16"}[args.precision]
    for flag, dtype in (("--param-dtype", args.param_dtype), ("--reduce-dtype", args.reduce_dtype)):
        if dtype not in (None, "fp32", allowed_half):
            raise ArgumentError(f"{flag} {dtype} needs --{dtype}, but the precision is {args.precision}")


def _validate_schedule_flags(args: argparse.Namespace) -> None:
    _check(
        args.global_batch_size is None or args.gradient_accumulation_steps is None,
        f"--global-batch-size {args.global_batch_size} and --gradient-accumulation-steps "
        f"{args.gradient_accumulation_steps} both set the global batch; give one",
    )
    # Whether the global batch splits into micro batches over the ranks: kotomamba.config, once the world size is known.
    lengths = [f"{flag} {value}" for flag, value in (("--train-iters", args.train_iters),
                                                      ("--train-samples", args.train_samples),
                                                      ("--train-tokens", args.train_tokens)) if value is not None]
    _check(len(lengths) <= 1, f"{' and '.join(lengths)} are exclusive (each sets the training length); give one")
    _check(lengths or args.dry_run or args.data_schedule is not None,
           "give the training length with --train-iters, --train-samples or --train-tokens")
    iteration_flags = {"--lr-decay-iters": args.lr_decay_iters, "--lr-warmup-iters": args.lr_warmup_iters,
                       "--lr-wsd-decay-iters": args.lr_wsd_decay_iters}
    sample_flags = {"--lr-decay-samples": args.lr_decay_samples, "--lr-warmup-samples": args.lr_warmup_samples,
                    "--lr-wsd-decay-samples": args.lr_wsd_decay_samples}
    if args.train_samples is not None:
        for flag, value in iteration_flags.items():
            _check(value is None, f"{flag} {value} is for --train-iters runs; with --train-samples use "
                                  f"{flag.replace('-iters', '-samples')}")
    else:
        for flag, value in sample_flags.items():
            _check(value is None, f"{flag} {value} needs --train-samples; with --train-iters or --train-tokens use "
                                  f"{flag.replace('-samples', '-iters')}")
    if args.lr_warmup_fraction is not None:
        _check(0 <= args.lr_warmup_fraction <= 1,
               f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
        for flag in ("--lr-warmup-iters", "--lr-warmup-samples"):
            value = getattr(args, flag[2:].replace("-", "_"))
            _check(value is None, f"--lr-warmup-fraction {args.lr_warmup_fraction} and {flag} {value} are exclusive")


def _validate_checkpointing(args: argparse.Namespace) -> None:
    if args.save is None:
        for flag, value in (("--keep-last-k", args.keep_last_k), ("--async-save", args.async_save or None)):
            _check(value is None, f"{flag} has no effect without --save DIR")


def _skip_ranges(values: list[int] | None) -> list[list[int]] | None:
    if values is None:
        return None
    _check(len(values) % 2 == 0,
           f"--skip-batch takes FIRST LAST iteration pairs, got {len(values)} values: {' '.join(map(str, values))}")
    ranges = [[first, last] for first, last in zip(values[0::2], values[1::2])]
    for first, last in ranges:
        _check(0 <= first <= last, f"--skip-batch {first} {last}: need 0 <= FIRST <= LAST")
    return sorted(ranges)
