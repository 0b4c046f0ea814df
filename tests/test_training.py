"""pretrain.py end to end on CPU with the real mamba-ssm model: against a plain PyTorch loop, across
gradient accumulation, sharding strategies, precisions, launchers (torchrun and mpirun over gloo),
loss-scale skips, --skip-batch, and the errors a user sees."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain

sys.path.insert(0, str(Path(__file__).parent))
from launching import launcher_environment, run_worker, torchrun_command  # noqa: E402
from reference_training import plain_training  # noqa: E402
from training_worker import run_configurations  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "training_worker.py"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training tests (gloo)")


@pytest.fixture(scope="module")
def base_argv(tiny_mamba1_config, sentencepiece_model, tokenized_corpus) -> list[str]:
    return [
        "--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(sentencepiece_model), "--data-path", str(tokenized_corpus),
        "--split", "90,10,0", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "3", "--lr", "2e-3", "--lr-warmup-iters", "1", "--eval-iters", "0", "--num-workers", "0",
        "--seed", "7", "--fp32",
    ]


@pytest.fixture(scope="module")
def baseline(base_argv, single_process) -> dict:
    return run_configurations({"baseline": base_argv}, single_process)["baseline"]


def run_in_process(ctx, **runs: list[str]) -> dict[str, dict]:
    return run_configurations(runs, ctx)


def assert_close(actual: list[float], expected: list[float], rtol: float) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert a == pytest.approx(e, rel=rtol), f"iteration {step}: {a} != {e}"


def test_fsdp_training_matches_a_plain_pytorch_loop(base_argv, baseline):
    """reference_training.plain_training: the same training as a plain loop over an unsharded model."""
    reference = plain_training(base_argv)
    expected_losses, expected_grad_norms = list(reference["loss"].values()), list(reference["grad_norm"].values())
    assert_close(baseline["loss"], expected_losses, rtol=1e-5)
    assert_close(baseline["grad_norm"], expected_grad_norms, rtol=1e-4)  # unsharded, in double precision
    assert expected_losses[-1] < expected_losses[0]


def test_gradient_accumulation_equals_one_large_micro_batch(base_argv, baseline, single_process, tmp_path):
    runs = run_in_process(
        single_process,
        micro1=base_argv + ["--micro-batch-size", "1"],
        micro4=base_argv + ["--micro-batch-size", "4"],
    )
    assert_close(runs["micro1"]["loss"], baseline["loss"], rtol=1e-5)
    assert_close(runs["micro4"]["loss"], baseline["loss"], rtol=1e-5)
    # Clipping makes the updates of a gradient and of a multiple of it alike: the norms and the weights
    # after the steps (saved and compared) must match too.
    assert_close(runs["micro1"]["grad_norm"], baseline["grad_norm"], rtol=1e-4)
    assert_close(runs["micro4"]["grad_norm"], baseline["grad_norm"], rtol=1e-4)
    from kotomamba.model_loading import load_model_from_checkpoint

    weights = {}
    for micro_batch in ("1", "2", "4"):
        save = tmp_path / f"micro{micro_batch}"
        # two iterations (the first has lr 0, warm-up from 0), saved when the run stops after the second
        run_in_process(single_process, one=base_argv + ["--micro-batch-size", micro_batch, "--save", str(save),
                                                        "--exit-interval", "2"])
        weights[micro_batch] = load_model_from_checkpoint(str(save), torch.device("cpu"))[0].state_dict()
    for name, expected in weights["4"].items():
        for micro_batch in ("1", "2"):
            torch.testing.assert_close(weights[micro_batch][name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_fp16_gradients_are_unscaled_before_the_clip_coefficient_is_taken(base_argv, baseline, single_process,
                                                                         monkeypatch):
    from kotomamba import optim

    clip_calls = []
    clip = optim.clip_grad_norm

    def recording_clip(parameters, max_norm, foreach=None):
        parameters = list(parameters)
        clip_calls.append((float(clip(parameters, None)), max_norm))  # the norm the coefficient comes from
        return clip(parameters, max_norm, foreach)

    monkeypatch.setattr(optim, "clip_grad_norm", recording_clip)
    true_norm = baseline["grad_norm"][0]
    max_norm = true_norm / 2  # this step is clipped: coefficient about 0.5
    argv = [a for a in base_argv if a != "--fp32"] + ["--fp16", "--initial-loss-scale", "1024",
                                                      "--grad-clip-norm", str(max_norm)]
    fp16 = run_in_process(single_process, fp16=argv)["fp16"]
    assert "error" not in fp16 and clip_calls, fp16
    norm, clipped_to = clip_calls[0]
    assert fp16["skipped"][0] is False
    # 1024 times the gradient if the clip came before unscaling (coefficient 1/2048 instead of 1/2)
    assert norm == pytest.approx(true_norm, rel=5e-2) and clipped_to == max_norm
    assert clipped_to / (norm + 1e-6) == pytest.approx(0.5, rel=5e-2)
    assert fp16["grad_norm"][0] == pytest.approx(norm, rel=1e-6)


def test_checkpointing_offload_meta_device_init_and_chunked_loss_change_nothing(base_argv, baseline, single_process):
    runs = run_in_process(
        single_process,
        checkpointing=base_argv + ["--fsdp-activation-checkpointing"],
        offload=base_argv + ["--fsdp-cpu-offload"],
        low_cpu=base_argv + ["--low-cpu-fsdp"],
        chunked_loss=base_argv + ["--cross-entropy-chunk-tokens", "5"],  # 64 tokens per micro-batch: uneven chunks
        first_block_checkpointed=base_argv + ["--activation-checkpointing-layers", "1"],  # of 2
        too_many_blocks=base_argv + ["--activation-checkpointing-layers", "3"],
    )
    assert runs["too_many_blocks"]["error"] == "--activation-checkpointing-layers 3: the model has only 2 Mamba blocks"
    assert runs["first_block_checkpointed"]["loss"] == pytest.approx(baseline["loss"], rel=1e-6)
    assert_close(runs["chunked_loss"]["loss"], baseline["loss"], rtol=1e-6)
    assert_close(runs["chunked_loss"]["grad_norm"], baseline["grad_norm"], rtol=1e-5)
    assert runs["checkpointing"]["loss"] == pytest.approx(baseline["loss"], rel=1e-6)
    assert runs["offload"]["loss"] == pytest.approx(baseline["loss"], rel=1e-6)
    assert runs["low_cpu"]["loss"] == baseline["loss"]  # bitwise: same initial weights


def test_chunked_loss_also_evaluates_like_the_full_logits(base_argv, single_process, tmp_path):
    """Validation with --cross-entropy-chunk-tokens: per-token losses a chunk at a time, the same figures."""
    from kotomamba import plot

    runs = {name: base_argv + ["--eval-interval", "3", "--eval-iters", "2", "--tensorboard-dir", str(tmp_path / name),
                               *extra]
            for name, extra in (("full", []), ("chunked", ["--cross-entropy-chunk-tokens", "5"]))}
    run_in_process(single_process, **runs)
    full, chunked = (plot.read_tensorboard(tmp_path / name) for name in runs)
    assert set(full["valid/loss"]) == set(chunked["valid/loss"]) == {3}
    assert chunked["valid/loss"][3] == pytest.approx(full["valid/loss"][3], rel=1e-6)



def test_activation_checkpointing_recomputes_only_the_chosen_blocks(tiny_mamba1_config):
    """A checkpointed block runs its mixer again in backward; the others run it once. (Pre-hooks: the
    recomputation stops early, once the last saved tensor is back, before the mixer returns.)"""
    from kotomamba.kernels import select_kernel_backend
    from kotomamba.model import build_model, load_model_config
    from kotomamba.parallel import apply_activation_checkpointing

    select_kernel_backend(torch.device("cpu"))
    calls = {}
    for blocks in (None, 1):
        model = build_model(load_model_config(str(tiny_mamba1_config), 500), seed=0)
        apply_activation_checkpointing(model, blocks)
        counts = [0] * len(model.backbone.layers)
        for index, layer in enumerate(model.backbone.layers):
            layer.mixer.register_forward_pre_hook(lambda *_, index=index: counts.__setitem__(index, counts[index] + 1))
        model(torch.randint(0, 500, (1, 8))).logits.sum().backward()
        calls[blocks] = counts
    assert calls[None] == [2, 2]  # every block by default
    assert calls[1] == [2, 1]  # --activation-checkpointing-layers 1


def test_data_from_another_tokenizer_is_a_clear_error(base_argv, single_process, tokenized_corpus):
    """Token ids beyond the embedding stop the run with the data named, not an index error in the model."""
    tokenizer = base_argv.index("--tokenizer-type")
    argv = base_argv[:tokenizer] + base_argv[tokenizer + 4:] + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50"]
    error = run_in_process(single_process, small_vocabulary=argv)["small_vocabulary"]["error"]
    assert error.startswith("the training data holds token id ") and f"--data-path {tokenized_corpus}" in error, error
    assert "outside the model's embedding of 56 rows" in error and "tokenized with another tokenizer?" in error

def test_bf16_and_fp16_presets_train(base_argv, baseline, single_process):
    argv = [a for a in base_argv if a != "--fp32"] + ["--train-iters", "4"]
    fp16 = argv + ["--fp16", "--initial-loss-scale", "1024"]
    runs = run_in_process(single_process, bf16=argv + ["--bf16"], fp16=fp16,
                          fp16_chunked_loss=fp16 + ["--cross-entropy-chunk-tokens", "24"])
    # The chunked loss under fp16 autocast and loss scaling: the same first loss, then the same curve.
    assert runs["fp16_chunked_loss"]["loss"][0] == pytest.approx(runs["fp16"]["loss"][0], rel=1e-5)
    assert_close(runs["fp16_chunked_loss"]["loss"], runs["fp16"]["loss"], rtol=1e-2)
    for name in ("bf16", "fp16"):
        losses = runs[name]["loss"]
        assert all(math.isfinite(loss) for loss in losses), (name, losses)
        # Low-precision compute stays within a few percent of fp32 on the first step.
        assert losses[0] == pytest.approx(baseline["loss"][0], rel=3e-2), name
        assert losses[-1] < losses[0], name


def test_fp16_overflow_skips_the_step_and_a_run_of_skips_stops_training(base_argv, single_process):
    argv = [a for a in base_argv if a != "--fp32"] + ["--fp16", "--train-iters", "4"]
    runs = run_in_process(
        single_process,
        backs_off=argv + ["--initial-loss-scale", str(2.0**40), "--hysteresis", "1"],
        stuck=argv + ["--initial-loss-scale", str(2.0**40), "--min-loss-scale", str(2.0**40),
                      "--max-consecutive-skips", "2"],
        # Megatron's defaults (loss scale from 2**32, hysteresis 2) with ours (--max-consecutive-skips 10):
        # the scale needs more than 10 overflowing steps to come down, and the run must go on.
        calibrating=argv + ["--train-iters", "24"],
    )
    calibrating = runs["calibrating"]
    assert "error" not in calibrating, calibrating
    overflowed = calibrating["skipped"].index(False)  # leading overflows while the scale came down
    assert overflowed > 10 and len(calibrating["skipped"]) == 24, calibrating["skipped"]
    assert sum(calibrating["skipped"][overflowed:]) <= 2, calibrating["skipped"]  # then it trains
    assert calibrating["loss_scale"][overflowed] < 2.0**32 and calibrating["loss"][-1] < calibrating["loss"][0]
    backs_off = runs["backs_off"]
    assert backs_off["skipped"] == [True] * 4  # 2**40 × loss overflows fp16 ...
    assert backs_off["loss_scale"] == [2.0**40, 2.0**39, 2.0**38, 2.0**37]  # ... and the scale backs off
    assert all(math.isfinite(loss) for loss in backs_off["loss"])  # the loss itself was fine
    assert "--max-consecutive-skips 2" in runs["stuck"]["error"]
    assert "stopping at iteration 2" in runs["stuck"]["error"]


def test_skip_batch_consumes_the_global_batch_without_training(base_argv, baseline, single_process):
    runs = run_in_process(single_process, skip=base_argv + ["--skip-batch", "2", "2"])
    skip = runs["skip"]
    assert skip["loss"][0] == baseline["loss"][0]
    assert skip["loss"][1] is None and skip["skipped"][1]
    assert skip["consumed_samples"] == 3 * 4
    assert skip["loss"][2] != baseline["loss"][2]  # iteration 3 saw batch 3 with weights updated once


def small_base_model(directory: Path, vocab_size: int) -> Path:
    """A mamba-ssm format directory (config.json + model.safetensors) whose embedding has `vocab_size` rows."""
    from safetensors.torch import save_file

    from kotomamba.model import build_model, load_model_config

    config = load_model_config("130m", vocab_size, {"d_model": 32, "n_layer": 2, "pad_vocab_size_multiple": 1})
    model = build_model(config, seed=0)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**config.__dict__}))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_two_processes_with_torchrun_match_one_process_for_every_strategy(base_argv, baseline, tmp_path):
    strategies = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
    runs = {s: base_argv + ["--sharding-strategy", s] for s in strategies}
    runs["bf16_mixed"] = [a for a in base_argv if a != "--fp32"] + ["--bf16"]
    runs["offload"] = base_argv + ["--fsdp-cpu-offload"]
    runs["chunked_loss"] = base_argv + ["--cross-entropy-chunk-tokens", "24"]
    runs["chunked_loss_zero2_offload"] = runs["chunked_loss"] + ["--sharding-strategy", "SHARD_GRAD_OP",
                                                                 "--fsdp-cpu-offload"]
    runs["bf16_chunked_loss"] = runs["bf16_mixed"] + ["--cross-entropy-chunk-tokens", "24"]
    # A base model whose embedding is smaller than the tokenizer: every rank must stop, none may hang.
    too_small = small_base_model(tmp_path / "base", vocab_size=100)
    model_flag = base_argv.index("--model")
    runs["embedding_too_small"] = base_argv[:model_flag] + base_argv[model_flag + 2:] + ["--base-model", str(too_small)]
    results = run_worker(torchrun_command(2), runs, tmp_path)
    assert "tokens but the base model" in results["embedding_too_small"]["error"]
    assert "has only 100 embedding rows" in results["embedding_too_small"]["error"]
    for strategy in strategies:
        assert_close(results[strategy]["loss"], baseline["loss"], rtol=1e-5)
        assert_close(results[strategy]["grad_norm"], baseline["grad_norm"], rtol=1e-4)
    assert results["bf16_mixed"]["loss"][0] == pytest.approx(baseline["loss"][0], rel=3e-2)
    assert_close(results["offload"]["loss"], baseline["loss"], rtol=1e-5)
    # FSDP gathers the root's parameters (tied embedding / lm_head) for the chunked loss as for forward.
    assert_close(results["chunked_loss"]["loss"], baseline["loss"], rtol=1e-5)
    assert_close(results["chunked_loss"]["grad_norm"], baseline["grad_norm"], rtol=1e-4)
    assert_close(results["chunked_loss_zero2_offload"]["loss"], baseline["loss"], rtol=1e-5)
    assert results["bf16_chunked_loss"]["loss"][0] == pytest.approx(results["bf16_mixed"]["loss"][0], rel=1e-5)
    assert_close(results["bf16_chunked_loss"]["loss"], results["bf16_mixed"]["loss"], rtol=1e-2)


def mpirun_executable() -> str | None:
    candidate = Path(sys.executable).parent / "mpirun"
    return str(candidate) if candidate.exists() else shutil.which("mpirun")


@pytest.mark.skipif(mpirun_executable() is None, reason="OpenMPI's mpirun is not installed")
def test_throughput_and_mfu_are_per_gpu_on_two_processes(base_argv, tiny_mamba1_config, tmp_path):
    """tokens/s per GPU is the total over the world size, and MFU is taken from the per-GPU figure."""
    from kotomamba import plot
    from kotomamba.flops import flops_per_token
    from kotomamba.model import load_model_config

    peak_tflops = 0.01
    argv = base_argv + ["--log-interval", "1", "--peak-tflops", str(peak_tflops), "--tensorboard-dir",
                        str(tmp_path / "tb")]
    results = run_worker(torchrun_command(2), {"two": argv}, tmp_path)
    assert "error" not in results["two"], results
    logged = plot.read_tensorboard(tmp_path / "tb")
    config = load_model_config(str(tiny_mamba1_config), 450)
    flops = flops_per_token(config, 32)
    tokens_per_iteration = 4 * 32  # --global-batch-size 4, --seq-length 32: all ranks together
    for step, total in logged["throughput/tokens_per_s"].items():
        per_gpu = logged["throughput/tokens_per_s_per_gpu"][step]
        seconds = logged["time/iteration_s"][step]
        assert total == pytest.approx(tokens_per_iteration / seconds, rel=1e-3)
        assert per_gpu == pytest.approx(total / 2, rel=1e-5)
        assert logged["throughput/mfu"][step] == pytest.approx(per_gpu * flops / (peak_tflops * 1e12), rel=1e-4)


def test_two_processes_with_mpirun_match_one_process(base_argv, baseline, tmp_path):
    command = [mpirun_executable(), "-np", "2", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "PATH", sys.executable]
    results = run_worker(command, {"mpi": base_argv}, tmp_path)
    assert_close(results["mpi"]["loss"], baseline["loss"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# What a user sees when the input is wrong: one line naming the problem, no traceback.


def run_pretrain(argv: list[str], capsys) -> tuple[int, str]:
    code = pretrain.main(argv)
    return code, capsys.readouterr().err


TYPO_MESSAGE = ("pretrain.py: error: unrecognized arguments: --lr-decay-stlye cosine "
                "(--lr-decay-stlye: did you mean --lr-decay-style")


def launched_typo(command: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(command + [str(Path(pretrain.__file__)), "--lr-decay-stlye", "cosine"], cwd=tmp_path,
                          env=launcher_environment(), capture_output=True, text=True, timeout=120)


def test_a_usage_error_under_torchrun_is_printed_once_and_ends_torchruns_report(tmp_path):
    completed = launched_typo(torchrun_command(2), tmp_path)
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    # rank 0 printed it once; torchrun's report ends with it as the root cause, exit code 2, no Python traceback
    assert sum(line.startswith(TYPO_MESSAGE) for line in lines) == 1, completed.stderr
    assert lines[-2].strip().startswith(f"traceback : {TYPO_MESSAGE}") and lines[-1].startswith("====="), lines[-6:]
    assert "exitcode  : 2" in completed.stderr and "To enable traceback" not in completed.stderr
    assert completed.returncode != 0


@pytest.mark.skipif(mpirun_executable() is None, reason="OpenMPI's mpirun is not installed")
def test_a_usage_error_under_mpirun_is_printed_once_with_the_usage_exit_status(tmp_path):
    command = [mpirun_executable(), "-np", "2", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    completed = launched_typo(command + ["-x", "PYTHONPATH", "-x", "PATH", sys.executable], tmp_path)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert (completed.stdout + completed.stderr).count(TYPO_MESSAGE) == 1


def test_missing_data_prefix_is_named(base_argv, capsys, tmp_path):
    missing = str(tmp_path / "nothing_text_document")
    argv = base_argv + ["--data-path", missing]
    code, err = run_pretrain(argv, capsys)
    assert code == 1 and missing in err and "Traceback" not in err


def test_missing_data_is_found_before_the_process_group_or_model(base_argv, capsys, tmp_path, monkeypatch):
    import kotomamba.train

    def setup_started(*args, **kwargs):
        raise AssertionError("pretrain() started before the data paths were checked")

    monkeypatch.setattr(kotomamba.train, "pretrain", setup_started)
    missing = str(tmp_path / "nothing_text_document")
    code, err = run_pretrain(base_argv + ["--data-path", "0.5", missing, "0.5", missing + "2"], capsys)
    assert code == 1 and f"--data-path {missing}: {missing}.bin and {missing}.idx not found" in err


def test_global_batch_that_does_not_divide_is_refused(base_argv, capsys):
    code, err = run_pretrain(base_argv + ["--global-batch-size", "5"], capsys)
    assert code == 2 and "--global-batch-size 5" in err


def test_unknown_flag_is_refused(base_argv, capsys):
    code, err = run_pretrain(base_argv + ["--learning-rate", "1"], capsys)
    assert code == 2 and "--learning-rate" in err



def test_a_fused_optimizer_skips_on_the_device_exactly_as_the_host_decides(single_process, tiny_mamba1_config,
                                                                          sentencepiece_model, tokenized_corpus,
                                                                          monkeypatch):
    """fp16 overflows skip the first steps: fused AdamW told by found_inf (as on a GPU, no host read before
    the step) gives the same losses, skips, loss scales and weights as the host's decision."""
    import kotomamba.optim
    import kotomamba.train

    argv = ["--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(sentencepiece_model), "--data-path", str(tokenized_corpus), "--split", "90,10,0",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "5",
            "--lr", "2e-3", "--eval-iters", "0", "--num-workers", "0", "--seed", "7", "--fp16",
            "--initial-loss-scale", str(2.0 ** 20), "--hysteresis", "1", "--grad-clip-norm", "0.05"]
    build = kotomamba.optim.build_optimizer
    monkeypatch.setattr(kotomamba.optim, "build_optimizer", lambda *a, **k: build(*a, **{**k, "fused": True}))
    on_device = run_configurations({"run": argv}, single_process)["run"]
    monkeypatch.setattr(kotomamba.train, "skips_on_device", lambda optimizer: False)
    on_host = run_configurations({"run": argv}, single_process)["run"]
    assert on_device["skipped"][:2] == [True, True] and not all(on_device["skipped"])
    for key in ("loss", "grad_norm", "skipped", "loss_scale"):
        assert on_device[key] == on_host[key], key


def test_blocks_grouped_into_larger_fsdp_units_train_exactly_the_same(single_process, tiny_mamba1_config,
                                                                     sentencepiece_model, tokenized_corpus, caplog):
    import logging

    argv = ["--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(sentencepiece_model), "--data-path", str(tokenized_corpus), "--split", "90,10,0",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
            "--lr", "2e-3", "--eval-iters", "0", "--num-workers", "0", "--seed", "7", "--bf16"]
    with caplog.at_level(logging.INFO, logger="kotomamba"):
        runs = run_configurations({"per_block": argv, "grouped": argv + ["--fsdp-blocks-per-unit", "2"]},
                                  single_process)
    assert runs["grouped"]["loss"] == runs["per_block"]["loss"] and len(runs["grouped"]["loss"]) == 3
    units = [line for line in caplog.text.splitlines() if "FSDP: strategy=" in line]
    assert "units=3 " in units[0] and "units=2 " in units[1]  # 2 blocks + root, then one unit of both + root


def _logged_numbers(save_dir: Path) -> list[dict]:
    """metrics.jsonl without the clock's figures (throughput, time), which no two runs share."""
    lines = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith(("throughput/", "time/"))} for line in lines]


def test_reading_each_steps_numbers_one_iteration_late_changes_no_number(base_argv, sentencepiece_model,
                                                                         tokenized_corpus, tmp_path):
    """Two processes (torchrun): fp16 whose first steps overflow (skipped on the scale's word, the scale backing
    off, then growing), --eod-mask-loss, a blend with --log-loss-per-dataset (reduced over the host group),
    validation and saves. Reporting each iteration one iteration late, as the loop does, or as soon as it is
    queued: the same steps, skips, loss scales, logged metrics and saved progress, bit for bit."""
    from conftest import mixed_texts, tokenize_to_prefix

    extra = tokenize_to_prefix(mixed_texts(200, seed=5), sentencepiece_model, tmp_path / "extra_text_document")
    data = base_argv.index("--data-path")
    argv = [a for a in base_argv[:data] + base_argv[data + 2:] if a != "--fp32"] + [
        "--data-path", "0.6", str(tokenized_corpus), "0.4", str(extra), "--micro-batch-size", "1",
        "--train-iters", "7", "--fp16", "--initial-loss-scale", str(2.0**20), "--hysteresis", "1",
        "--loss-scale-window", "2", "--eod-mask-loss", "--log-loss-per-dataset", "--log-interval", "2",
        "--eval-interval", "3", "--eval-iters", "1", "--save-interval", "4"]
    runs = {name: {"argv": argv + ["--save", str(tmp_path / name)], "report_at_once": name == "at_once"}
            for name in ("late", "at_once")}
    results = run_worker(torchrun_command(2), runs, tmp_path)
    late, at_once = results["late"], results["at_once"]
    assert "error" not in late and "error" not in at_once, results
    assert late["iteration"] == list(range(1, 8))
    assert late["skipped"][0] and not all(late["skipped"]), late["skipped"]  # the scale at work
    assert len(set(late["loss_scale"])) > 2, late["loss_scale"]
    assert late == at_once
    assert _logged_numbers(tmp_path / "late") == _logged_numbers(tmp_path / "at_once")
    logged = _logged_numbers(tmp_path / "late")
    assert any("train/corpus_text_document/loss" in line for line in logged)
    assert any("valid/loss" in line for line in logged)
    for name in ("iter_0000004", "iter_0000007"):
        saved = [json.loads((tmp_path / run / name / "checkpoint.json").read_text()) for run in runs]
        assert saved[0]["loss_scaler"] == saved[1]["loss_scaler"]
        assert saved[0]["train_state"] == saved[1]["train_state"]
        assert saved[0]["train_state"]["iteration"] == int(name[5:])


def test_a_steps_numbers_are_read_once_the_next_step_is_queued(base_argv, baseline, single_process, tmp_path,
                                                                monkeypatch):
    """The host reads iteration N's numbers after queueing N + 1, except where the run needs them now:
    before a save (here at iteration 2) and at the end. The numbers are the baseline's."""
    from kotomamba.step_readback import QueuedStep
    from kotomamba.train import Trainer

    events = []
    queue, read = Trainer.train_step, QueuedStep.result
    monkeypatch.setattr(Trainer, "train_step", lambda self, **k: events.append("queue") or queue(self, **k))
    monkeypatch.setattr(QueuedStep, "result", lambda self: events.append("read") or read(self))
    result = run_in_process(single_process, run=base_argv + ["--save", str(tmp_path / "run"), "--save-interval", "2"])
    assert events == ["queue", "queue", "read", "read", "queue", "read"]
    assert result["run"]["loss"] == baseline["loss"] and result["run"]["iteration"] == [1, 2, 3]


def test_an_error_in_a_step_still_reports_the_iterations_before_it(base_argv, baseline, single_process, monkeypatch):
    """Iteration 2's second micro-batch is refused: iteration 1, still pending then, is reported before the error."""
    from kotomamba.train import TokenIdCheck, TrainingError

    checked = TokenIdCheck.__call__
    calls = []

    def refuse_the_fourth(self, batch, split):
        calls.append(split)
        if len(calls) == 4:
            raise TrainingError("the training data holds token id 99999 (a test)")
        return checked(self, batch, split)

    monkeypatch.setattr(TokenIdCheck, "__call__", refuse_the_fourth)
    recorded = []
    from kotomamba.config import parse_run_config
    from kotomamba.train import run_training

    with pytest.raises(TrainingError, match="token id 99999"):
        run_training(parse_run_config(base_argv, 1), single_process,
                     lambda state, result: recorded.append((state.iteration, result.loss)))
    assert recorded == [(1, baseline["loss"][0])]
