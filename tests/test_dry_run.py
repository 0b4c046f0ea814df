"""pretrain.py --dry-run (kotomamba/dry_run.py): world layout, batch arithmetic, token budget, exact
parameter count, memory estimate, warnings instead of failures for files missing on a login node."""
from __future__ import annotations

import json
import shutil
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kotomamba import dry_run
from kotomamba.arguments import ArgumentError, parse_args
from kotomamba.dry_run import DEFAULT_VOCAB_SIZE, STATE_BYTES, DryRunError, format_plan, plan, world_layout

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE",
                      "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_RANK")
NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]


def dry(*extra: str):
    return parse_args(["--dry-run", *extra])


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A two-layer Mamba-1 config.json: built for real in a moment."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"d_model": 64, "n_layer": 2, "ssm_cfg": {"layer": "Mamba1"},
                                "pad_vocab_size_multiple": 8, "vocab_size": 1}))
    return path


# ----------------------------------------------------------------------------------------------
# World layout


def test_world_layout_comes_from_torchrun():
    layout = world_layout(dry(*NULL), {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})
    assert (layout.world_size, layout.gpus_per_node, layout.num_nodes) == (16, 8, 2)
    assert "torchrun" in layout.source


def test_world_layout_comes_from_mpirun():
    environ = {"OMPI_COMM_WORLD_SIZE": "12", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    layout = world_layout(dry(*NULL, "--use-mpi"), environ)
    assert (layout.world_size, layout.gpus_per_node) == (12, 4)
    assert "mpirun" in layout.source


def test_launcher_environment_wins_over_the_flags_with_a_warning():
    warnings: list[str] = []
    args = dry(*NULL, "--dry-run-world-size", "64", "--dry-run-gpus-per-node", "4")
    layout = world_layout(args, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, warnings)
    assert (layout.world_size, layout.gpus_per_node) == (8, 8)
    assert any("ignored" in warning and "WORLD_SIZE=8" in warning for warning in warnings)


@pytest.mark.parametrize("flags, expected", [
    ([], (1, 1)),
    (["--dry-run-world-size", "32", "--dry-run-gpus-per-node", "4"], (32, 4)),
    (["--dry-run-world-size", "6"], (6, 6)),  # fits one node
    (["--dry-run-world-size", "64"], (64, 8)),
    (["--dry-run-world-size", "12"], (12, 4)),
    (["--dry-run-gpus-per-node", "4"], (4, 4)),  # one node of 4
])
def test_world_layout_from_the_flags(flags, expected):
    layout = world_layout(dry(*NULL, *flags), {})
    assert (layout.world_size, layout.gpus_per_node) == expected


@pytest.mark.parametrize("flags, environ, message", [
    (["--dry-run-world-size", "12", "--dry-run-gpus-per-node", "8"], {},
     "--dry-run-world-size 12 is not a multiple of --dry-run-gpus-per-node 8"),
    (["--dry-run-world-size", "4", "--dry-run-gpus-per-node", "8"], {},
     "--dry-run-gpus-per-node 8 is more than --dry-run-world-size 4"),
    ([], {"WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not an integer"),
    ([], {"WORLD_SIZE": "10", "LOCAL_WORLD_SIZE": "4"}, "WORLD_SIZE 10 is not a multiple of LOCAL_WORLD_SIZE 4"),
])
def test_inconsistent_world_layouts_are_errors_naming_the_source(flags, environ, message):
    with pytest.raises(DryRunError, match=message):
        world_layout(dry(*NULL, *flags), environ)


@pytest.mark.parametrize("flag", ["--dry-run-world-size", "--dry-run-gpus-per-node"])
def test_dry_run_world_flags_need_dry_run_and_positive_values(flag):
    with pytest.raises(ArgumentError, match=f"{flag} 8 only applies with --dry-run"):
        parse_args(["--lr", "1e-3", "--train-iters", "10", "--data-path", "p", *NULL, flag, "8"])
    with pytest.raises(ArgumentError, match=f"{flag} must be at least 1, got 0"):
        dry(*NULL, flag, "0")


def test_dry_run_needs_no_lr_training_length_or_data():
    args = dry(*NULL)
    assert args.lr is None and args.train_iters is None and args.data_path is None
    result = plan(args, {})
    assert result.total_tokens is None
    assert any("--lr" in warning for warning in result.warnings)


# ----------------------------------------------------------------------------------------------
# Batch arithmetic and token budget


def test_batch_arithmetic_and_token_budget():
    args = dry(*NULL, "--micro-batch-size", "4", "--global-batch-size", "1024", "--seq-length", "2048",
               "--train-iters", "191000", "--lr", "8e-4", "--lr-warmup-iters", "2000",
               "--dry-run-world-size", "32", "--dry-run-gpus-per-node", "8")
    result = plan(args, {})
    assert result.accumulation == 1024 // (4 * 32) == 8
    assert result.tokens_per_iteration == 1024 * 2048
    assert result.total_tokens == 191000 * 1024 * 2048
    report = dry_run.format_plan(result)
    assert "8 = global batch 1024 / (micro batch 4 x data parallel 32)" in report
    assert "1,024 samples x 2048 tokens = 2,097,152 tokens per iteration" in report
    assert "400,556,032,000 (400.56B) = 191,000 x 2,097,152" in report
    assert "32 = 4 node(s) x 8 per node" in report
    assert "0.0008 -> 0, linear decay to iteration 191,000, 2,000 warmup iterations" in report


def test_global_batch_defaults_to_micro_batch_times_data_parallel_times_accumulation():
    result = plan(dry(*NULL, "--micro-batch-size", "2", "--dry-run-world-size", "8"), {})
    assert (result.config.batch.global_batch_size, result.accumulation) == (16, 1)
    result = plan(dry(*NULL, "--micro-batch-size", "2", "--gradient-accumulation-steps", "4",
                      "--dry-run-world-size", "8"), {})
    assert (result.config.batch.global_batch_size, result.accumulation) == (64, 4)


def test_train_samples_become_iterations_once_the_world_is_known():
    result = plan(dry(*NULL, "--train-samples", "10000", "--micro-batch-size", "2", "--dry-run-world-size", "4"), {})
    assert result.config.batch.global_batch_size == 8
    assert result.config.batch.train_iters == 10000 // 8
    assert result.total_tokens == 1250 * 8 * 2048


def test_train_tokens_show_planned_and_trained_tokens():
    result = plan(dry(*NULL, "--train-tokens", "1e9", "--micro-batch-size", "4", "--dry-run-world-size", "8"), {})
    tokens_per_iteration = 4 * 8 * 2048
    assert result.config.batch.train_iters == -(-10 ** 9 // tokens_per_iteration) == 15259
    assert result.total_tokens == 15259 * tokens_per_iteration >= 10 ** 9
    report = format_plan(result)
    assert f"15,259 = --train-tokens 1,000,000,000 / {tokens_per_iteration:,} tokens per iteration, rounded up" in report
    assert f"({15259 * tokens_per_iteration - 10 ** 9:,} past the 1,000,000,000 (1.00B) planned" in report


def test_a_global_batch_that_does_not_split_over_the_ranks_fails_with_exit_2(capsys):
    args = dry(*NULL, "--micro-batch-size", "4", "--global-batch-size", "1000", "--dry-run-world-size", "32")
    assert dry_run.run(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--global-batch-size 1000 is not a multiple of --micro-batch-size 4 × data-parallel size 32" in captured.err


def test_only_rank_0_prints(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dry_run.run(dry(*NULL)) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert dry_run.run(dry(*NULL)) == 0
    assert "WORLD_SIZE=2" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Model: exact parameter count, vocabulary


def test_parameter_count_equals_the_real_model(tiny_config):
    from kotomamba.model import build_model, count_parameters, load_model_config

    result = plan(dry("--model", str(tiny_config), *NULL), {})
    real = build_model(load_model_config(str(tiny_config), 1001), seed=0)  # NullTokenizer(1000): 1001 ids
    assert result.model.vocab_size == 1001
    assert result.model.parameters == count_parameters(real) == sum(p.numel() for p in real.parameters())
    assert result.model.embedding_rows == real.backbone.embedding.num_embeddings == 1008
    assert result.model.embedding_parameters == 1008 * 64


def test_preset_130m_parameter_count_equals_the_real_model():
    from kotomamba.model import build_model, count_parameters, load_model_config

    result = plan(dry("--model", "130m", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50276"), {})
    real = build_model(load_model_config("130m", 50277), seed=0)
    assert result.model.parameters == count_parameters(real) == 129_135_360  # state-spaces/mamba-130m


def test_vocabulary_comes_from_the_tokenizer(sentencepiece_model):
    from megatron_lm.tokenizer import build_tokenizer

    result = plan(dry("--model", "130m", "--tokenizer-model", str(sentencepiece_model)), {})
    assert result.model.vocab_size == build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model)).vocab_size
    assert not [warning for warning in result.warnings if "tokenizer" in warning]


def test_a_missing_tokenizer_means_the_default_vocabulary_and_a_warning(tmp_path):
    result = plan(dry("--model", "130m", "--tokenizer-model", str(tmp_path / "absent.model")), {})
    assert result.model.vocab_size == DEFAULT_VOCAB_SIZE
    assert any("absent.model: not found" in warning for warning in result.warnings)
    assert "assumed" in dry_run.format_plan(result)


def test_continual_pretraining_keeps_the_base_models_vocabulary(tmp_path, sentencepiece_model):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "vocab_size": 300,
                                                  "pad_vocab_size_multiple": 8}))
    result = plan(dry("--base-model", str(base), *NULL[:2], "--vocab-size", "100"), {})
    assert (result.model.vocab_size, result.model.embedding_rows) == (300, 304)
    assert f"300 ({base}/config.json; the tokenizer's 101 fit)" in dry_run.format_plan(result)
    # the 450-piece tokenizer does not fit the 304 rows: the real run would stop, so does the dry run
    with pytest.raises(DryRunError, match="the tokenizer has 45[0-9] tokens but the model's embedding only 304 rows"):
        plan(dry("--base-model", str(base), "--tokenizer-model", str(sentencepiece_model)), {})
    from_scratch = plan(dry("--base-model", str(base), "--from-scratch", "--tokenizer-model", str(sentencepiece_model)), {})
    assert from_scratch.model.embedding_rows >= 450


# ----------------------------------------------------------------------------------------------
# Memory


def _memory(*extra: str):
    return plan(dry("--model", "370m", *NULL, "--micro-batch-size", "2", *extra), {})


def test_sharded_state_is_16_bytes_per_parameter_over_the_shard_group():
    full = _memory("--dry-run-world-size", "16", "--dry-run-gpus-per-node", "4")
    sharded = full.model.parameters - full.model.fp32_sensitive_parameters
    assert full.model.fp32_sensitive_parameters > 0  # bf16: A_log, D, dt_bias stay whole in fp32
    assert full.memory.sharded_state == math.ceil(sharded / 16) * STATE_BYTES
    assert full.memory.replicated_state == full.model.fp32_sensitive_parameters * STATE_BYTES
    hybrid = _memory("--dry-run-world-size", "16", "--dry-run-gpus-per-node", "4", "--sharding-strategy", "HYBRID_SHARD")
    assert hybrid.memory.sharded_state == math.ceil(sharded / 4) * STATE_BYTES
    replicated = _memory("--dry-run-world-size", "16", "--sharding-strategy", "NO_SHARD")
    assert replicated.memory.sharded_state == sharded * STATE_BYTES


def test_gathered_parameters_follow_the_precision_and_strategy():
    bf16 = _memory("--bf16")
    in_flight = bf16.model.root_parameters + 2 * bf16.model.largest_block_parameters
    assert bf16.memory.gathered == in_flight * (2 + 4)  # bf16 parameters, fp32 gradient reduction
    fp16 = _memory("--fp16")  # V100 preset: fp32 parameters under fp16 autocast, fp16 reduction
    assert fp16.memory.gathered == in_flight * (4 + 2) and fp16.model.fp32_sensitive_parameters == 0
    zero2 = _memory("--bf16", "--sharding-strategy", "SHARD_GRAD_OP")
    # ZeRO-2 keeps every parameter gathered (bf16) from forward to backward
    sharded = zero2.model.parameters - zero2.model.fp32_sensitive_parameters
    assert zero2.memory.gathered == sharded * 2 + in_flight * 4


def test_activations_scale_with_the_micro_batch_and_shrink_with_checkpointing():
    one = plan(dry("--model", "370m", *NULL, "--micro-batch-size", "1"), {}).memory.activations
    four = plan(dry("--model", "370m", *NULL, "--micro-batch-size", "4"), {}).memory.activations
    assert four == 4 * one
    checkpointed = plan(dry("--model", "370m", *NULL, "--micro-batch-size", "4", "--fsdp-activation-checkpointing"),
                        {}).memory.activations
    assert checkpointed < four / 2


def test_logits_activation_term_grows_with_the_vocabulary():
    # bf16 logits (2 B) + their fp32 copy for the loss (4 B) + the fp32 gradient (4 B) per vocabulary row
    small = plan(dry("--model", "130m", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1023"), {})
    large = plan(dry("--model", "130m", "--tokenizer-type", "NullTokenizer", "--vocab-size", "2047"), {})
    assert large.model.embedding_rows - small.model.embedding_rows == 1024
    assert large.memory.activations - small.memory.activations == 2048 * 1024 * (2 + 8)


def test_checkpointing_some_blocks_lands_between_none_and_all():
    argv = ("--model", "370m", *NULL, "--micro-batch-size", "4")  # 48 blocks
    estimate = {n: plan(dry(*argv, *flags), {}).memory.activations
                for n, flags in ((0, ()), *((n, ("--activation-checkpointing-layers", str(n))) for n in (12, 24, 36)),
                                 (48, ("--fsdp-activation-checkpointing",)))}
    assert estimate[0] > estimate[12] > estimate[24] > estimate[36] > estimate[48]
    # Identical Mamba-1 blocks: past the one block being recomputed, each checkpointed block saves the same.
    assert estimate[12] - estimate[24] == estimate[24] - estimate[36] == estimate[36] - estimate[48]
    assert plan(dry(*argv, "--activation-checkpointing-layers", "48"), {}).memory.activations == estimate[48]
    assert "first 12 of 48 blocks" in dry_run.format_plan(plan(dry(*argv, "--activation-checkpointing-layers", "12"), {}))
    with pytest.raises(ArgumentError, match="--activation-checkpointing-layers 49: the model has only 48 Mamba blocks"):
        plan(dry(*argv, "--activation-checkpointing-layers", "49"), {})


def test_chunked_loss_bounds_the_logits_term_by_the_chunk():
    argv = ("--model", "130m", *NULL, "--micro-batch-size", "4", "--seq-length", "2048")
    full = plan(dry(*argv), {})
    chunked = plan(dry(*argv, "--cross-entropy-chunk-tokens", "1024"), {})
    rows, d_model, tokens = full.model.embedding_rows, 768, 4 * 2048
    logits = (2 + 8) * rows  # bf16 logits, fp32 copy and gradient, per token
    expected_saving = tokens * (logits - 4) - (1024 * logits + 4 * rows * d_model)
    assert full.memory.activations - chunked.memory.activations == expected_saving
    assert "logits of 1,024 tokens at a time" in dry_run.format_plan(chunked)


def test_cpu_offload_moves_the_sharded_state_to_host_memory():
    offloaded = _memory("--fsdp-cpu-offload")
    on_gpu = _memory()
    assert offloaded.memory.sharded_state == 0
    assert offloaded.memory.host_state == on_gpu.memory.sharded_state > 0
    assert "of CPU memory per rank" in dry_run.format_plan(offloaded)


def test_checkpoint_size_is_12_bytes_per_parameter(tmp_path):
    result = _memory("--save", str(tmp_path), "--train-iters", "1200", "--save-interval", "500",
                     "--keep-last-k", "2", "--dry-run-world-size", "8")
    assert result.checkpoint_bytes == 12 * result.model.parameters
    assert "3 saves every 500 iterations, 2 kept" in dry_run.format_plan(result)


# ----------------------------------------------------------------------------------------------
# Data


def test_missing_data_is_a_warning_and_existing_data_is_measured(tmp_path):
    from megatron_lm.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path

    prefix = str(tmp_path / "corpus_text_document")
    with IndexedDatasetBuilder(data_file_path(prefix), np.int32) as builder:
        for length in (1000, 3000):
            builder.add_item(np.arange(length, dtype=np.int32))
            builder.end_document()
        builder.finalize(index_file_path(prefix))
    absent = str(tmp_path / "absent_text_document")
    args = dry(*NULL, "--data-path", "0.25", prefix, "0.75", absent, "--split", "100,0,0",
               "--train-iters", "1", "--global-batch-size", "1", "--seq-length", "2000")
    assert dry_run.run(args) == 0
    result = plan(args, {})
    assert any("absent_text_document.bin/.idx not found" in warning for warning in result.warnings)
    report = "\n".join(result.data_lines)
    assert f" 25.0%  {prefix}  (4.00k tokens, 0.12 epochs of its training part)" in report  # 0.25 x 2000 / 4000
    assert f" 75.0%  {absent}  (not found)" in report
    assert not any("times over" in warning for warning in result.warnings)
    # 400 iterations of 2000 tokens: 800,000 planned, a quarter of it from 4,000 tokens: 50 epochs
    repeated = plan(dry(*NULL, "--data-path", "0.25", prefix, "0.75", absent, "--split", "100,0,0",
                        "--train-iters", "400", "--global-batch-size", "1", "--seq-length", "2000"), {})
    assert any(f"reads {prefix} 50.0 times over" in warning for warning in repeated.warnings), repeated.warnings


# ----------------------------------------------------------------------------------------------
# The command line, as on a login node


def test_pretrain_dry_run_cli_needs_no_gpu_process_group_or_training_code(tmp_path):
    code = (
        "import sys, torch, pretrain\n"
        "code = pretrain.main(sys.argv[1:])\n"
        "import torch.distributed as dist\n"
        "assert 'kotomamba.train' not in sys.modules, 'the dry run imported the training loop'\n"
        "assert not dist.is_initialized() and not torch.cuda.is_initialized()\n"
        "sys.exit(code)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    environment["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, "-c", code, "--dry-run", "--model", "130m", "--tokenizer-model", str(tmp_path / "none.model"),
         "--data-path", str(tmp_path / "missing_text_document"), "--global-batch-size", "256",
         "--micro-batch-size", "8", "--train-iters", "4800", "--lr", "3e-3", "--dry-run-world-size", "8"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for expected in ("Resolved configuration", "World layout", "Batch", "Training length", "Model",
                     "Memory per GPU (estimate)", "Checkpoints", "Data", "Warnings",
                     "4 = global batch 256 / (micro batch 8 x data parallel 8)", "FLOPs per token",
                     "129,135,360", "missing_text_document.bin/.idx not found"):
        assert expected in done.stdout, expected


def test_our_scan_keeps_no_scan_output_and_one_state_per_sequence():
    # --selective-scan kotomamba: the scan output (bf16, d_inner per token) is recomputed in backward, and
    # only the final state is kept; 370m: 48 Mamba-1 layers, d_inner 2048, d_state 16
    argv = ("--model", "370m", *NULL, "--micro-batch-size", "2", "--seq-length", "4096", "--bf16")
    theirs = plan(dry(*argv, "--selective-scan", "mamba-ssm"), {}).memory.activations
    auto = plan(dry(*argv), {}).memory.activations
    ours = plan(dry(*argv, "--selective-scan", "kotomamba"), {}).memory.activations
    per_layer = 2 * 4096 * 2 * 2048 + 2 * 4 * 2048 * 2 * 16 * (2 - 1)  # output, and a second chunk's states
    assert auto == theirs and theirs - ours == 48 * per_layer


def test_the_plan_warns_when_the_kept_checkpoints_do_not_fit_where_save_is(tmp_path, monkeypatch):
    flags = (*NULL, "--train-iters", "1000", "--save-interval", "100", "--save", str(tmp_path / "run" / "deeper"))
    result = plan(dry(*flags, "--keep-last-k", "2"), {})
    assert result.save_free_bytes == shutil.disk_usage(tmp_path).free  # the nearest existing directory
    free = int(2.5 * result.checkpoint_bytes)
    monkeypatch.setattr("kotomamba.dry_run.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))
    assert not any("--save" in warning for warning in plan(dry(*flags, "--keep-last-k", "1"), {}).warnings)
    (warning,) = [w for w in plan(dry(*flags, "--keep-last-k", "2"), {}).warnings if w.startswith("--save")]
    assert "the 3 checkpoints kept at once need" in warning
    assert "free there now" in format_plan(plan(dry(*flags), {}))


def test_the_peak_holds_the_activations_or_the_gradient_shards_not_both():
    """Backward frees activations layer by layer while FSDP writes each layer's gradient shards, so the
    estimate takes the larger of the two (it overestimated the measured peaks by 20% adding both)."""
    small, large = (plan(dry("--model", "1.4b", *NULL, "--micro-batch-size", mbs, "--seq-length", "512"), {}).memory
                    for mbs in ("1", "16"))
    for memory in (small, large):
        assert memory.sharded_gradients == memory.sharded_state // STATE_BYTES * 4
        persistent = memory.sharded_state - memory.sharded_gradients + memory.replicated_state + memory.gathered
        assert memory.total == persistent + max(memory.activations, memory.sharded_gradients)
    assert small.activations < small.sharded_gradients and large.activations > large.sharded_gradients
    offloaded = plan(dry("--model", "1.4b", *NULL, "--fsdp-cpu-offload"), {}).memory
    assert offloaded.sharded_gradients == 0 and offloaded.total == (offloaded.replicated_state + offloaded.gathered
                                                                    + offloaded.activations)
