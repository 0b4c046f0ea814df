"""pretrain.py's command line: every flag, kotomamba/Megatron aliases, --config YAML, validation, derived values."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kotomamba import arguments, config as run_config
from kotomamba.arguments import ArgumentError, parse_args
from kotomamba.config import build_run_config

BASE = ["--lr", "1e-3", "--train-iters", "100", "--data-path", "corpus_text_document",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]


def parse(*extra: str) -> argparse.Namespace:
    return parse_args(BASE + list(extra))


def error_of(argv: list[str]) -> str:
    with pytest.raises(ArgumentError) as caught:
        build_run_config(parse_args(argv), 1)
    return str(caught.value)


def build(*extra: str, world_size: int = 1) -> run_config.RunConfig:
    return build_run_config(parse(*extra), world_size)


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "mamba-130m"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"d_model": 768, "n_layer": 24}))
    return directory


# ----------------------------------------------------------------------------- every flag

# option -> (extra argv, dest, expected value). Flags that need other flags carry them along.
FLAG_CASES: dict[str, tuple[list[str], str, object]] = {
    "--model": (["--model", "mamba2-370m"], "model", "mamba2-370m"),
    "--from-scratch": (["--from-scratch", "--base-model", "{ckpt}"], "from_scratch", True),
    "--base-model": (["--base-model", "{ckpt}"], "base_model", "{ckpt}"),
    "--vocab-size": (["--vocab-size", "1000"], "vocab_size", 1000),
    "--tokenizer-type": (["--tokenizer-type", "sentencepiecetokenizer", "--tokenizer-model", "t.model",
                          "--vocab-size", None], "tokenizer_type", "SentencePieceTokenizer"),
    "--tokenizer-model": (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "tok_dir",
                           "--vocab-size", None], "tokenizer_model", "tok_dir"),
    "--data-path": (["--data-path", "0.3", "a", "0.7", "b"], "data_path", ["0.3", "a", "0.7", "b"]),
    "--split": (["--split", "90,5,5"], "split", "90,5,5"),
    "--train-data-path": (["--data-path", None, "--train-data-path", "t1", "t2"], "train_data_path", ["t1", "t2"]),
    "--valid-data-path": (["--data-path", None, "--train-data-path", "t", "--valid-data-path", "v"],
                          "valid_data_path", ["v"]),
    "--test-data-path": (["--data-path", None, "--train-data-path", "t", "--test-data-path", "1", "x"],
                         "test_data_path", ["1", "x"]),
    "--data-cache-path": (["--data-cache-path", "/cache"], "data_cache_path", "/cache"),
    "--reset-state-at-eod": (["--reset-state-at-eod"], "reset_state_at_eod", True),
    "--reset-attention-mask": (["--reset-attention-mask"], "reset_state_at_eod", True),
    "--eod-mask-loss": (["--eod-mask-loss"], "eod_mask_loss", True),
    "--data-schedule": (["--data-path", None, "--train-iters", None, "--data-schedule", "stages.yaml"], "data_schedule",
                        "stages.yaml"),
    "--num-workers": (["--num-workers", "0"], "num_workers", 0),
    "--seq-length": (["--seq-length", "4096"], "seq_length", 4096),
    "--seed": (["--seed", "42"], "seed", 42),
    "--micro-batch-size": (["--micro-batch-size", "4"], "micro_batch_size", 4),
    "--global-batch-size": (["--global-batch-size", "64"], "global_batch_size", 64),
    "--gradient-accumulation-steps": (["--gradient-accumulation-steps", "8"], "gradient_accumulation_steps", 8),
    "--train-iters": (["--train-iters", "7"], "train_iters", 7),
    "--train-tokens": (["--train-iters", None, "--train-tokens", "2e9"], "train_tokens", 2_000_000_000),
    "--train-samples": (["--train-iters", None, "--train-samples", "640", "--global-batch-size", "64"],
                        "train_samples", 640),
    "--lr": (["--lr", "3e-4"], "lr", 3e-4),
    "--min-lr": (["--min-lr", "1e-5"], "min_lr", 1e-5),
    "--lr-decay-style": (["--lr-decay-style", "Cosine"], "lr_decay_style", "cosine"),
    "--lr-decay-iters": (["--lr-decay-iters", "80"], "lr_decay_iters", 80),
    "--lr-decay-samples": (["--train-iters", None, "--train-samples", "640", "--global-batch-size", "64",
                            "--lr-decay-samples", "320"], "lr_decay_samples", 320),
    "--lr-warmup-iters": (["--lr-warmup-iters", "10"], "lr_warmup_iters", 10),
    "--lr-warmup-fraction": (["--lr-warmup-fraction", "0.1"], "lr_warmup_fraction", 0.1),
    "--lr-warmup-samples": (["--train-iters", None, "--train-samples", "640", "--global-batch-size", "64",
                             "--lr-warmup-samples", "128"], "lr_warmup_samples", 128),
    "--lr-warmup-init": (["--lr-warmup-init", "1e-6"], "lr_warmup_init", 1e-6),
    "--lr-wsd-decay-style": (["--lr-wsd-decay-style", "minus_sqrt"], "lr_wsd_decay_style", "minus_sqrt"),
    "--lr-wsd-decay-iters": (["--lr-decay-style", "wsd", "--lr-wsd-decay-iters", "20"], "lr_wsd_decay_iters", 20),
    "--lr-wsd-decay-samples": (["--train-iters", None, "--train-samples", "640", "--global-batch-size", "64",
                                "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "128"],
                               "lr_wsd_decay_samples", 128),
    "--adam-beta1": (["--adam-beta1", "0.8"], "adam_beta1", 0.8),
    "--adam-beta2": (["--adam-beta2", "0.999"], "adam_beta2", 0.999),
    "--adam-eps": (["--adam-eps", "1e-8"], "adam_eps", 1e-8),
    "--weight-decay": (["--weight-decay", "0.1"], "weight_decay", 0.1),
    "--grad-clip-norm": (["--grad-clip-norm", "0.5"], "grad_clip_norm", 0.5),
    "--bf16": (["--bf16"], "precision", "bf16"),
    "--fp16": (["--fp16"], "precision", "fp16"),
    "--fp32": (["--fp32"], "precision", "fp32"),
    "--param-dtype": (["--bf16", "--param-dtype", "bf16"], "param_dtype", "bf16"),
    "--reduce-dtype": (["--fp16", "--reduce-dtype", "FP16"], "reduce_dtype", "fp16"),
    "--initial-loss-scale": (["--initial-loss-scale", "65536"], "initial_loss_scale", 65536.0),
    "--min-loss-scale": (["--min-loss-scale", "2"], "min_loss_scale", 2.0),
    "--loss-scale-window": (["--loss-scale-window", "500"], "loss_scale_window", 500),
    "--hysteresis": (["--hysteresis", "4"], "hysteresis", 4),
    "--data-allow-extra-bin-bytes": (["--data-allow-extra-bin-bytes"], "data_allow_extra_bin_bytes", True),
    "--selective-scan": (["--selective-scan", "Mamba-SSM"], "selective_scan", "mamba-ssm"),
    "--sharding-strategy": (["--sharding-strategy", "hybrid_shard"], "sharding_strategy", "HYBRID_SHARD"),
    "--fsdp-activation-checkpointing": (["--fsdp-activation-checkpointing"], "fsdp_activation_checkpointing", True),
    "--cross-entropy-chunk-tokens": (["--cross-entropy-chunk-tokens", "4096"], "cross_entropy_chunk_tokens", 4096),
    "--fsdp-blocks-per-unit": (["--fsdp-blocks-per-unit", "4"], "fsdp_blocks_per_unit", 4),
    "--activation-checkpointing-layers": (["--activation-checkpointing-layers", "3"], "activation_checkpointing_layers", 3),
    "--fsdp-cpu-offload": (["--fsdp-cpu-offload"], "fsdp_cpu_offload", True),
    "--low-cpu-fsdp": (["--low-cpu-fsdp"], "low_cpu_fsdp", True),
    "--use-mpi": (["--use-mpi"], "use_mpi", True),
    "--eval-interval": (["--eval-interval", "250"], "eval_interval", 250),
    "--eval-iters": (["--eval-iters", "0"], "eval_iters", 0),
    "--log-loss-per-dataset": (["--log-loss-per-dataset"], "log_loss_per_dataset", True),
    "--log-interval": (["--log-interval", "10"], "log_interval", 10),
    "--wandb-entity": (["--wandb-entity", "team"], "wandb_entity", "team"),
    "--wandb-project": (["--wandb-project", "proj"], "wandb_project", "proj"),
    "--wandb-name": (["--wandb-name", "run-1"], "wandb_name", "run-1"),
    "--tensorboard-dir": (["--tensorboard-dir", "/tb"], "tensorboard_dir", "/tb"),
    "--optimizer-stats-interval": (["--optimizer-stats-interval", "50"], "optimizer_stats_interval", 50),
    "--skip-batch": (["--skip-batch", "5000", "5000", "1200", "1210"], "skip_batch", [[1200, 1210], [5000, 5000]]),
    "--max-consecutive-skips": (["--max-consecutive-skips", "0"], "max_consecutive_skips", 0),
    "--save": (["--save", "/ckpt"], "save", "/ckpt"),
    "--load": (["--load", "/ckpt"], "load", "/ckpt"),
    "--save-interval": (["--save-interval", "1000"], "save_interval", 1000),
    "--checkpoint-type": (["--checkpoint-type", "FULL_STATE_DICT"], "checkpoint_type", "FULL_STATE_DICT"),
    "--async-save": (["--save", "/ckpt", "--async-save"], "async_save", True),
    "--keep-last-k": (["--save", "/ckpt", "--keep-last-k", "3"], "keep_last_k", 3),
    "--exit-interval": (["--exit-interval", "20"], "exit_interval", 20),
    "--override-data-on-resume": (["--override-data-on-resume"], "override_data_on_resume", True),
    "--exit-duration-in-mins": (["--exit-duration-in-mins", "230.5"], "exit_duration_in_mins", 230.5),
    "--config": ([], "config", None),  # covered by the YAML tests
    "--dry-run": (["--dry-run"], "dry_run", True),
    "--dry-run-world-size": (["--dry-run", "--dry-run-world-size", "32"], "dry_run_world_size", 32),
    "--dry-run-gpus-per-node": (["--dry-run", "--dry-run-gpus-per-node", "4"], "dry_run_gpus_per_node", 4),
    "--peak-tflops": (["--peak-tflops", "989"], "peak_tflops", 989.0),
}

# alias -> the canonical option whose dest it sets
ALIASES = {
    "--model-name": "--base-model", "--tokenizer-name": "--tokenizer-model", "--val-data-path": "--valid-data-path",
    "--num-workers-dataloader": "--num-workers", "--context-size": "--seq-length",
    "--sequence-length": "--seq-length", "--batch-size": "--micro-batch-size",
    "--batch-size-training": "--micro-batch-size", "--lr-min": "--min-lr", "--lr-warmup": "--lr-warmup-fraction",
    "--clip-grad": "--grad-clip-norm", "--clip-grad-norm": "--grad-clip-norm", "--pure-bf16": "--bf16",
    "--use-bf16": "--bf16", "--use-fp16": "--fp16", "--use-fp32": "--fp32", "--wandb-exp-name": "--wandb-name",
    "--save-checkpoint-path": "--save", "--load-checkpoint-path": "--load",
    "--save-interval-iteration": "--save-interval",
}

IGNORED = {
    "--mamba": [], "--sliding-window-size": ["4096"], "--attention-dropout": ["0.1"], "--hidden-dropout": ["0.1"],
    "--use-better-transformer": [], "--vocab-file": ["vocab.json"], "--merge-file": ["merges.txt"],
    "--reset-position-ids": [], "--retro-return-doc-ids": [],
    "--short-seq-prob": ["0.1"], "--mixed-precision": [], "--enable-fsdp": [], "--fsdp": [],
    "--use-torch-fsdp2": [], "--use-distributed-optimizer": [],
    "--run-validation": [], "--save-model": [], "--save-optimizer": [],
}

# refused flag -> (argv, a harmless value or None)
REFUSED = {
    "--make-vocab-size-divisible-by": (["128"], None), "--quantization": ([], None), "--freeze-layers": ([], None),
    "--num-freeze-layers": (["2"], "0"), "--vocab-extra-ids": (["100"], "0"),
    "--dataset": (["pile_dataset"], None), "--num-epochs": (["1"], None), "--lr-decay": (["0.8"], None),
    "--optimizer": (["anyprecision"], "adam"),
}


def _with_overrides(extra: list, checkpoint: Path) -> list[str]:
    """BASE with `extra` applied; a flag followed by None removes that flag (and its values) from BASE."""
    argv = list(BASE)
    tokens = [str(checkpoint) if token == "{ckpt}" else token for token in extra]
    result: list[str] = []
    index = 0
    while index < len(tokens):
        if index + 1 < len(tokens) and tokens[index + 1] is None:
            flag = tokens[index]
            position = argv.index(flag)
            end = position + 1
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            del argv[position:end]
            index += 2
        else:
            result.append(tokens[index])
            index += 1
    return argv + result


def test_every_option_of_the_parser_is_covered_by_a_test_table():
    options = {option for action in arguments.build_parser()._actions for option in action.option_strings}
    covered = set(FLAG_CASES) | set(ALIASES) | set(IGNORED) | set(REFUSED) | {"-h", "--help"}
    assert options == covered


@pytest.mark.parametrize("flag", sorted(FLAG_CASES))
def test_flag_parses_to_its_value(flag, checkpoint_dir):
    extra, dest, expected = FLAG_CASES[flag]
    args = parse_args(_with_overrides(extra, checkpoint_dir))
    if expected == "{ckpt}":
        expected = str(checkpoint_dir)
    assert getattr(args, dest) == expected


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_sets_the_same_value_as_its_canonical_flag(alias, checkpoint_dir):
    canonical = ALIASES[alias]
    extra, dest, _ = FLAG_CASES[canonical]
    # replace the canonical flag by the alias (written kotomamba-style with underscores) in the same argv
    underscored = "--" + alias[2:].replace("-", "_")
    aliased = [underscored if token == canonical else token for token in extra]
    assert underscored in aliased
    by_alias = parse_args(_with_overrides(aliased, checkpoint_dir))
    by_canonical = parse_args(_with_overrides(extra, checkpoint_dir))
    assert getattr(by_alias, dest) == getattr(by_canonical, dest)


@pytest.mark.parametrize("flag", sorted(IGNORED))
def test_compatibility_flags_are_accepted_and_change_nothing(flag):
    with_flag = parse(flag, *IGNORED[flag])
    assert vars(with_flag) == vars(parse())


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flags_say_why(flag):
    values, harmless = REFUSED[flag]
    message = error_of(BASE + [flag, *values])
    assert message.startswith(flag)
    assert "not supported" in message
    if harmless is not None:
        assert vars(parse(flag, harmless)) == vars(parse())


def test_every_flag_has_help():
    parser = arguments.build_parser()
    legacy_section = parser.format_help().split("aliases and legacy flags:")[1]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:  # a compatibility flag: listed with its reason in the last group
            line = next(line for line in legacy_section.splitlines() if action.option_strings[0] + ":" in line
                        or action.option_strings[0] + "," in line)
            assert len(line.split(":", 1)[1].strip()) > 20, action.option_strings
            continue
        assert action.help and len(action.help) > 20, action.option_strings


def test_help_leads_with_the_flags_people_use_and_lists_aliases_once_at_the_end():
    text = arguments.build_parser().format_help()
    usage, body = text.split("\n\n", 1)
    assert usage.startswith("usage: pretrain.py --model PRESET|CONFIG --tokenizer-model PATH --data-path")
    main_part, legacy_part = body.split("aliases and legacy flags:")
    for legacy_flag in ("--mamba", "--use-better-transformer", "--quantization", "--pure-bf16", "--clip-grad"):
        assert legacy_flag not in usage and f"  {legacy_flag}" not in main_part, legacy_flag
        assert len(re.findall(re.escape(legacy_flag) + r"(?![\w-])", legacy_part)) == 1, legacy_flag
    assert "--pure-bf16, --use-bf16 = --bf16" in " ".join(legacy_part.split())
    assert "  --bf16 " in main_part and "  --micro-batch-size MICRO_BATCH_SIZE" in main_part


def test_underscore_spelling_and_equals_sign():
    args = parse_args(["--lr=2e-4", "--train_iters", "10", "--data_path", "p", "--tokenizer_type=NullTokenizer",
                       "--vocab_size", "8", "--wandb_name", "x_y", "--low_cpu_fsdp"])
    assert (args.lr, args.train_iters, args.wandb_name, args.low_cpu_fsdp) == (2e-4, 10, "x_y", True)
    assert args.data_path == ["p"]


def test_abbreviations_are_not_accepted():
    assert "unrecognized arguments: --seq" in error_of(BASE + ["--seq", "128"])


def test_kotomamba_megatron_style_script_parses(checkpoint_dir, tmp_path):
    # the flags of kotomamba's scripts/abci/training/A-node/mambda-2.8b.sh (data list shortened)
    tokenizer = "/bb/llm/tokenizer/code20K_en40K_ja60K.ver2.2.model"
    argv = (
        "--seq-length 2048 --sliding-window-size 2048 --micro-batch-size 8 --global-batch-size 1024 "
        "--train-iters 191000 --tokenizer-type SentencePieceTokenizer "
        f"--tokenizer-model {tokenizer} --data-path 1542288829 /d/ja_wikipedia_text_document "
        "9051743591 /d/merged_0_text_document --split 949,50,1 --lr 8e-4 --min-lr 1e-5 --lr-decay-style cosine "
        "--lr-warmup-iters 2000 --lr-decay-iters 191000 --weight-decay 0.1 --grad-clip-norm 1 --optimizer adam "
        "--adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-6 --save-interval 500 --eval-interval 100 --eval-iters 10 "
        f"--bf16 --mixed-precision --base-model {checkpoint_dir} --save /ckpt --load /ckpt --low-cpu-fsdp "
        "--sharding-strategy FULL_SHARD --checkpoint-type LOCAL_STATE_DICT --fsdp-activation-checkpointing "
        "--use-mpi --from-scratch --mamba --wandb-entity prj-jalm --wandb-project ABCI-mamba --wandb-name job"
    ).split()
    args = parse_args(argv)
    assert args.data_path == ["1542288829", "/d/ja_wikipedia_text_document", "9051743591", "/d/merged_0_text_document"]
    assert (args.precision, args.from_scratch, args.checkpoint_type) == ("bf16", True, "LOCAL_STATE_DICT")
    assert args.tokenizer_model == tokenizer and args.base_model == str(checkpoint_dir)
    config = build_run_config(args, 32)
    assert (config.optimizer.lr_warmup_iters, config.optimizer.lr_decay_iters, config.batch.train_iters) == (
        2000, 191000, 191000)
    assert config.batch.gradient_accumulation_steps == 1024 // (8 * 32)


def test_kotomamba_llama_recipes_script_points_to_the_replacements():
    argv = ["--enable_fsdp", "--low_cpu_fsdp", "--mixed_precision", "--use_bf16", "--num_epochs", "1",
            "--lr", "1e-3", "--data-path", "p", "--tokenizer-type", "NullTokenizer", "--vocab-size", "8"]
    message = error_of(argv)
    assert "--num-epochs 1" in message and "--train-iters" in message


# ----------------------------------------------------------------------------- defaults and derived values

def test_defaults():
    args = parse()
    assert (args.model, args.split, args.num_workers, args.seed) == ("130m", "969,30,1", 2, 1234)
    assert (args.precision, args.param_dtype, args.reduce_dtype) == ("auto", None, None)
    assert (args.sharding_strategy, args.checkpoint_type) == ("FULL_SHARD", "SHARDED_STATE_DICT")
    assert (args.grad_clip_norm, args.initial_loss_scale, args.lr_decay_style) == (1.0, 2.0 ** 32, "linear")
    optimizer = build().optimizer
    assert (optimizer.lr_decay_iters, optimizer.lr_warmup_iters) == (100, 0)


def test_train_samples_become_iterations_with_sample_based_schedule():
    argv = _with_overrides(["--train-iters", None, "--train-samples", "10000", "--global-batch-size", "64",
                            "--micro-batch-size", "4", "--lr-warmup-samples", "640", "--lr-decay-samples", "9000",
                            "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "1280"], Path())
    config = build_run_config(parse_args(argv), 1)
    assert config.batch.train_iters == 10000 // 64
    optimizer = config.optimizer
    assert (optimizer.lr_warmup_iters, optimizer.lr_decay_iters, optimizer.lr_wsd_decay_iters) == (10, 9000 // 64, 20)


def test_train_tokens_become_the_fewest_iterations_that_reach_them():
    argv = _with_overrides(["--train-iters", None, "--train-tokens", "1e6", "--seq-length", "1000",
                            "--global-batch-size", "64", "--lr-warmup-fraction", "0.1"], Path())
    config = build_run_config(parse_args(argv), 4)
    assert config.batch.train_iters == 16  # 15 iterations of 64,000 tokens are 960,000: one more reaches 1e6
    assert (config.optimizer.lr_decay_iters, config.optimizer.lr_warmup_iters) == (16, 1)
    argv = _with_overrides(["--train-iters", None, "--train-tokens", "1024000", "--seq-length", "1000",
                            "--micro-batch-size", "8"], Path())
    assert build_run_config(parse_args(argv), 2).batch.train_iters == 64  # exactly 64 x 16 x 1000


def test_train_tokens_take_the_iteration_schedule_flags():
    argv = _with_overrides(["--train-iters", None, "--train-tokens", "1e6", "--lr-warmup-samples", "8"], Path())
    message = error_of(argv)
    assert "--lr-warmup-samples 8 needs --train-samples" in message and "--train-tokens use --lr-warmup-iters" in message


def test_warmup_fraction_is_a_fraction_of_the_decay():
    assert build("--lr-decay-iters", "80", "--lr-warmup-fraction", "0.25").optimizer.lr_warmup_iters == 20


def test_train_samples_without_global_batch_wait_for_the_world_size():
    args = parse_args(_with_overrides(["--train-iters", None, "--train-samples", "1000", "--micro-batch-size", "2",
                                       "--lr-warmup-fraction", "0.1"], Path()))
    assert args.train_iters is None and args.global_batch_size is None
    config = build_run_config(args, 5)
    batch, optimizer = config.batch, config.optimizer
    assert (batch.global_batch_size, batch.train_iters, optimizer.lr_decay_iters, optimizer.lr_warmup_iters) == (
        10, 100, 100, 10)
    assert (batch.data_parallel_size, batch.gradient_accumulation_steps) == (5, 1)
    assert build_run_config(args, 5) == config  # the flags are left unchanged: building again gives the same
    assert args.train_iters is None and args.global_batch_size is None


def test_legacy_gradient_accumulation_steps_set_the_global_batch():
    batch = build("--micro-batch-size", "8", "--gradient-accumulation-steps", "4", world_size=16).batch
    assert batch.gradient_accumulation_steps == 4
    assert batch.global_batch_size == 8 * 4 * 16


def test_gradient_accumulation_steps():
    assert run_config.gradient_accumulation_steps(1024, 8, 32) == 4
    assert run_config.gradient_accumulation_steps(96, 2, 6) == 8
    with pytest.raises(ArgumentError) as caught:
        run_config.gradient_accumulation_steps(100, 4, 8)
    message = str(caught.value)
    assert "--global-batch-size 100" in message and "--micro-batch-size 4" in message
    assert "data-parallel size 8 = 32" in message and "100 = 3 × 32 + 4" in message and "96 or 128" in message
    with pytest.raises(ArgumentError, match="data-parallel size must be at least 1"):
        run_config.gradient_accumulation_steps(8, 1, 0)


def test_the_run_config_rejects_a_global_batch_that_does_not_split_over_the_ranks():
    args = parse("--global-batch-size", "48", "--micro-batch-size", "4")
    with pytest.raises(ArgumentError, match="--global-batch-size 48 is not a multiple"):
        build_run_config(args, 8)


def test_tokenizer_type_is_inferred_from_the_tokenizer_model():
    base = _with_overrides(["--tokenizer-type", None, "--vocab-size", None], Path())
    assert parse_args(base + ["--tokenizer-model", "ja.model"]).tokenizer_type == "SentencePieceTokenizer"
    assert parse_args(base + ["--tokenizer-model", "gpt-neox-20b"]).tokenizer_type == "HuggingFaceTokenizer"


def test_model_accepts_a_config_path(checkpoint_dir):
    assert parse("--model", str(checkpoint_dir)).model == str(checkpoint_dir)
    assert parse("--model", str(checkpoint_dir / "config.json")).model == str(checkpoint_dir / "config.json")
    assert parse("--model", "2.8B").model == "2.8b"


def test_dry_run_needs_no_lr_length_or_data():
    args = parse_args(["--dry-run", "--tokenizer-type", "NullTokenizer", "--vocab-size", "8"])
    assert args.lr is None and args.train_iters is None and args.data_path is None


# ----------------------------------------------------------------------------- validation errors

VALIDATION_ERRORS = [
    (["--global-batch-size", "100", "--micro-batch-size", "3"], ["--global-batch-size 100", "--micro-batch-size 3"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size must be at least 1, got 0"]),
    (["--seq-length", "-5"], ["--seq-length must be at least 1, got -5"]),
    (["--train-iters", "0"], ["--train-iters must be at least 1, got 0"]),
    (["--num-workers", "-1"], ["--num-workers must be at least 0"]),
    (["--cross-entropy-chunk-tokens", "-1"], ["--cross-entropy-chunk-tokens must be at least 0, got -1"]),
    (["--activation-checkpointing-layers", "0"], ["--activation-checkpointing-layers must be at least 1, got 0"]),
    (["--min-lr", "0.01"], ["--lr 0.001 is below --min-lr 0.01"]),
    (["--lr", "-1"], ["--lr must be a finite number >= 0, got -1.0"]),
    (["--adam-beta2", "1.0"], ["--adam-beta2 must be in [0, 1), got 1.0"]),
    (["--adam-eps", "0"], ["--adam-eps must be a finite number > 0"]),
    (["--lr-warmup-iters", "200"], ["warmup (200 iterations)", "decay (100 iterations"]),
    (["--lr-decay-iters", "50", "--lr-warmup-iters", "60"], ["warmup (60 iterations)", "--lr-decay-iters"]),
    (["--lr-warmup-fraction", "1.5"], ["--lr-warmup-fraction must be in [0, 1], got 1.5"]),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], ["--lr-warmup-fraction 0.1 and --lr-warmup-iters 5"]),
    (["--lr-decay-style", "step"], ["--lr-decay-style", "'step' is not one of"]),
    (["--lr-decay-style", "WSD"], ["--lr-decay-style WSD needs --lr-wsd-decay-iters"]),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "100", "--lr-warmup-iters", "10"],
     ["--lr-wsd-decay-iters 100", "before the warmup ends (10)"]),
    (["--train-samples", "1000"], ["--train-iters 100 and --train-samples 1000 are exclusive"]),
    (["--train-tokens", "1e6"], ["--train-iters 100 and --train-tokens 1000000 are exclusive"]),
    (["--train-tokens", "1.5"], ["'1.5' is not a whole number of tokens"]),
    (["--train-tokens", "0"], ["--train-tokens must be at least 1, got 0"]),
    (["--lr-warmup-samples", "64"], ["--lr-warmup-samples 64 needs --train-samples", "--lr-warmup-iters"]),
    (["--global-batch-size", "64", "--gradient-accumulation-steps", "2"], ["--gradient-accumulation-steps 2"]),
    (["--bf16", "--fp16"], ["--fp16", "not allowed with argument --bf16"]),
    (["--fp32", "--param-dtype", "bf16"], ["--param-dtype bf16 needs --bf16", "precision is fp32"]),
    (["--fp16", "--reduce-dtype", "bf16"], ["--reduce-dtype bf16 needs --bf16"]),
    (["--bf16", "--param-dtype", "fp16"], ["--param-dtype fp16 needs --fp16"]),
    (["--param-dtype", "fp8"], ["--param-dtype", "'fp8' is not one of fp32, bf16, fp16"]),
    (["--data-path", "0.5", "a", "0.5"], ["--data-path has 3 values", "WEIGHT PREFIX pairs"]),
    (["--data-path", "0.5", "a", "heavy", "b"], ["--data-path: weight 2 is 'heavy', not a number"]),
    (["--data-path", "a", "0.5", "b"], ["--data-path: '0.5' looks like a weight"]),
    (["--data-path", "0.5", "a", "-1", "b"], ["--data-path: weight '-1' must be a finite number >= 0"]),
    (["--data-path", "0", "a", "0", "b"], ["--data-path: the weights 0 0 sum to 0"]),
    (["--data-path", "corpus_text_document.bin"], ["names a file", "'corpus_text_document'"]),
    (["--data-path"], ["--data-path needs at least one dataset prefix"]),
    (["--train-data-path", "t"], ["--data-path and --train-data-path are exclusive"]),
    (["--split", "90,5,5,0"], ["--split '90,5,5,0' must be 1 to 3 numbers"]),
    (["--split", "a,b"], ["--split 'a,b' must be 1 to 3 numbers"]),
    (["--split", "0,50,50"], ["--split '0,50,50' leaves nothing for training"]),
    (["--skip-batch", "10", "20", "30"], ["--skip-batch takes FIRST LAST iteration pairs, got 3 values"]),
    (["--skip-batch", "20", "10"], ["--skip-batch 20 10: need 0 <= FIRST <= LAST"]),
    (["--skip-batch", "ten", "20"], ["--skip-batch", "invalid int value: 'ten'"]),
    (["--keep-last-k", "2"], ["--keep-last-k has no effect without --save"]),
    (["--async-save"], ["--async-save has no effect without --save"]),
    (["--save", "/c", "--keep-last-k", "0"], ["--keep-last-k must be at least 1, got 0"]),
    (["--from-scratch"], ["--from-scratch needs --base-model"]),
    (["--model", "9b"], ["--model '9b' is neither a preset"]),
    (["--base-model", "/nonexistent/mamba"], ["--base-model /nonexistent/mamba: no such directory"]),
    (["--tokenizer-type", "SentencePieceTokenizer"], ["--tokenizer-type SentencePieceTokenizer needs --tokenizer-model"]),
    (["--seed", "-1"], ["--seed must be at least 0"]),
    (["--peak-tflops", "0"], ["--peak-tflops must be a finite number > 0"]),
    (["--min-loss-scale", "10", "--initial-loss-scale", "2"], ["--min-loss-scale 10.0 is above --initial-loss-scale 2.0"]),
    (["--unknown-flag"], ["unrecognized arguments: --unknown-flag"]),
    (["--train-iters", "many"], ["--train-iters", "invalid int value: 'many'"]),
]


@pytest.mark.parametrize("extra,fragments", VALIDATION_ERRORS, ids=[" ".join(case[0]) for case in VALIDATION_ERRORS])
def test_validation_error_names_the_flag_and_value(extra, fragments):
    message = error_of(BASE + extra)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("removed,fragment", [
    (["--lr", None], "--lr is required"),
    (["--train-iters", None], "--train-iters, --train-samples or --train-tokens"),
    (["--data-path", None], "no training data"),
    (["--tokenizer-type", None], "--tokenizer-type is required"),
    (["--tokenizer-type", None, "--tokenizer-model", "spm.model"], "--vocab-size 512 only applies to"),
    (["--vocab-size", None], "NullTokenizer needs --vocab-size"),
    (["--data-path", None, "--valid-data-path", "v"], "--valid-data-path given without --train-data-path"),
    (["--data-path", None, "--train-data-path", "t", "--split", "1,1,1"], "--split 1,1,1 only applies to --data-path"),
    (["--train-iters", None, "--train-samples", "100", "--global-batch-size", "128"],
     "--train-samples 100 is less than one global batch (128)"),
    (["--train-iters", None, "--train-samples", "1000", "--lr-decay-iters", "9"],
     "--lr-decay-iters 9 is for --train-iters runs; with --train-samples use --lr-decay-samples"),
])
def test_missing_or_conflicting_flags(removed, fragment):
    assert fragment in error_of(_with_overrides(removed, Path()))


def test_model_and_base_model_conflict(checkpoint_dir):
    assert "drop --model" in error_of(BASE + ["--model", "370m", "--base-model", str(checkpoint_dir)])


def test_base_model_without_config_json(tmp_path):
    assert "holds no config.json" in error_of(BASE + ["--base-model", str(tmp_path)])


def test_base_model_that_is_a_training_checkpoint_says_what_to_do(tmp_path):
    (tmp_path / "run" / "iter_0000002").mkdir(parents=True)
    (tmp_path / "run" / "iter_0000002" / "checkpoint.json").write_text("{}")
    (tmp_path / "run" / "latest").write_text("iter_0000002\n")
    for directory in (tmp_path / "run", tmp_path / "run" / "iter_0000002"):
        error = error_of(BASE + ["--base-model", str(directory)])
        assert error.startswith(f"--base-model {directory} is a kotomamba training checkpoint: continue that run "
                                f"with --load {directory}"), error
        assert f"python -m kotomamba.convert {directory} OUT --format mamba-ssm" in error


# ----------------------------------------------------------------------------- --config YAML

def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_yaml_sets_flags_with_dashes_or_underscores(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", """
lr: 1e-4                 # a string to YAML 1.1, converted like the command line
min-lr: 1.0e-5
train_iters: 500
micro_batch_size: 2
global-batch-size: 16
data_path: [0.7, ja_text_document, 0.3, en_text_document]
tokenizer_type: nulltokenizer
vocab_size: 1024
bf16: true
fsdp_activation_checkpointing: true
skip_batch: [[100, 110], [7, 7]]
lr_decay_style: wsd
lr_wsd_decay_iters: 50
wandb-exp-name: from-yaml
mamba: true
optimizer: adamw
""")
    args = parse_args(["--config", str(config)])
    assert (args.lr, args.min_lr, args.train_iters, args.global_batch_size) == (1e-4, 1e-5, 500, 16)
    assert args.data_path == ["0.7", "ja_text_document", "0.3", "en_text_document"]
    assert (args.tokenizer_type, args.precision, args.lr_decay_style) == ("NullTokenizer", "bf16", "WSD")
    assert args.fsdp_activation_checkpointing is True and args.wandb_name == "from-yaml"
    assert args.skip_batch == [[7, 7], [100, 110]]
    assert args.config == str(config)


def test_command_line_overrides_config(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", "lr: 1.0e-4\ntrain_iters: 500\nbf16: true\ndata_path: a b\n"
                                               "tokenizer_type: NullTokenizer\nvocab_size: 64\nseed: 7\n")
    args = parse_args(["--config", str(config), "--lr", "5e-4", "--fp32", "--data-path", "c"])
    assert (args.lr, args.precision, args.data_path) == (5e-4, "fp32", ["c"])
    assert (args.train_iters, args.seed, args.vocab_size) == (500, 7, 64)


def test_config_written_from_resolved_precision_key(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", "precision: fp16\n")
    assert parse("--config", str(config)).precision == "fp16"


@pytest.mark.parametrize("text,fragments", [
    ("learning_rate: 0.1\n", ["unknown key 'learning_rate'"]),
    ("lr_decay_itres: 10\n", ["unknown key 'lr_decay_itres'", "did you mean 'lr-decay-iters'"]),
    ("micro_batch_size: 2.5\n", ["key 'micro_batch_size'", "2.5 is not a valid int"]),
    ("bf16: yes please\n", ["key 'bf16'", "expected true or false"]),
    ("lr: [1, 2]\n", ["key 'lr'", "expected a single value"]),
    ("lr_decay_style: step\n", ["key 'lr_decay_style'", "'step' is not one of"]),
    ("num_epochs: 3\n", ["key 'num_epochs'", "not supported"]),
    ("precision: fp8\n", ["key 'precision' must be one of"]),
    ("- lr\n- 1\n", ["must be a mapping of flag names to values, got list"]),
    ("lr: [1\n", ["not valid YAML", "line"]),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, fragments):
    config = write_yaml(tmp_path / "bad.yaml", text)
    message = error_of(BASE + ["--config", str(config)])
    assert f"--config {config}" in message
    for fragment in fragments:
        assert fragment in message


def test_missing_config_file(tmp_path):
    assert "cannot read it" in error_of(BASE + ["--config", str(tmp_path / "absent.yaml")])


def test_empty_config_changes_nothing(tmp_path):
    config = write_yaml(tmp_path / "empty.yaml", "# nothing\n")
    with_config = vars(parse("--config", str(config)))
    with_config.pop("config")
    without = vars(parse())
    without.pop("config")
    assert with_config == without


# ----------------------------------------------------------------------------- resolved config and helpers

def test_resolved_config_round_trips_through_yaml_and_json(checkpoint_dir):
    args = parse("--skip-batch", "3", "4", "--base-model", str(checkpoint_dir), "--bf16", "--save", "/c")
    resolved = run_config.config_dict(build_run_config(args, 1))
    assert {name for section in resolved.values() for name in section} == set(vars(args)) | {"data_parallel_size",
                                                                                              "stages"}
    assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved
    assert json.loads(json.dumps(resolved)) == resolved
    assert resolved["logging"]["skip_batch"] == [[3, 4]] and resolved["batch"]["data_parallel_size"] == 1


# The --help group each config section holds (every flag of the group, nothing else).
SECTION_GROUPS = {"model": "model", "tokenizer": "tokenizer", "data": "data", "batch": "batch size and training length",
                  "optimizer": "optimizer and learning-rate schedule", "precision": "precision", "kernels": "kernels",
                  "parallel": "FSDP", "logging": "evaluation and logging", "checkpoint": "checkpointing",
                  "misc": "miscellaneous"}


def test_each_config_section_holds_exactly_the_flags_of_its_help_group():
    groups = {group.title: {action.dest for action in group._group_actions if action.dest != argparse.SUPPRESS}
              for group in arguments.build_parser()._action_groups}
    groups["miscellaneous"] |= {"config"}  # --config sits with --help, above the groups
    derived = {"batch": {"data_parallel_size"}, "data": {"stages"}}  # set by the world size and the schedule file
    assert set(SECTION_GROUPS) == set(run_config.SECTIONS)
    for section, kind in run_config.SECTIONS.items():
        names = {field.name for field in dataclasses.fields(kind)}
        assert names == groups[SECTION_GROUPS[section]] | derived.get(section, set()), section


def test_the_run_config_is_frozen_and_leaves_the_flags_unchanged():
    args = parse("--micro-batch-size", "2", "--data-path", "0.5", "a", "0.5", "b")
    before = vars(args).copy()
    config = build_run_config(args, 4)
    assert vars(args) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch.micro_batch_size = 4
    assert config.data.data_path == ("0.5", "a", "0.5", "b")  # tuples: nothing inside can change either
    assert (config.batch.micro_batch_size, config.batch.global_batch_size) == (2, 8)


def test_parse_blend_and_split():
    assert arguments.parse_blend(["p"], "--data-path") == (["p"], None)
    assert arguments.parse_blend(["a", "b"], "--data-path") == (["a", "b"], None)
    assert arguments.parse_blend(["1", "a", "3", "b"], "--data-path") == (["a", "b"], [1.0, 3.0])
    assert arguments.parse_split("969, 30, 1") == pytest.approx([0.969, 0.030, 0.001])
    assert arguments.parse_split("90/10") == pytest.approx([0.9, 0.1, 0.0])
    assert arguments.parse_split("100") == [1.0, 0.0, 0.0]


def test_importing_the_parser_does_not_import_torch():
    code = "import sys, kotomamba.arguments; sys.exit(1 if 'torch' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_flags_get_the_closest_known_options_suggested():
    with pytest.raises(arguments.ArgumentError) as error:
        parse_args(["--lr-decay-stlye", "cosine", "--micro_batch_sise", "2", "--frobnicate"])
    message = str(error.value)
    assert "--lr-decay-stlye: did you mean --lr-decay-style" in message
    assert "--micro-batch-sise: did you mean --micro-batch-size?" in message
    assert "--frobnicate:" not in message  # nothing close: no guess
    with pytest.raises(arguments.ArgumentError) as alias_error:
        parse_args(["--use-bf17"])
    assert "did you mean --use-bf16" in str(alias_error.value)  # aliases are suggested too
