"""Checkpoints on GPUs (`python -m pytest -m gpu tests/gpu/test_checkpoint_gpu.py`, 2 GPUs): NCCL with
background saves on their own gloo group, CUDA RNG states, resuming a 2-GPU checkpoint on 1 GPU, and
both ranks killed with SIGKILL in the middle of a save.

mamba-ssm's CUDA backward kernels accumulate with atomics, so two GPU runs are not bitwise equal: a
resumed run is compared with an uninterrupted one within what that nondeterminism leaves."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from launching import TRAINING_WORKER, launcher_environment, run_worker, torchrun_command  # noqa: E402


def launch(nproc: int, runs: dict, tmp_path: Path) -> dict[str, dict]:
    results = run_worker(torchrun_command(nproc), runs, tmp_path, timeout=900, name=f"runs{nproc}")
    assert all("error" not in result for result in results.values()), results
    return results


def relative_differences(actual: list[float], expected: list[float]) -> list[float]:
    return [abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True)]


def gpu_training_argv(directory: Path, sentencepiece_model: Path, tokenized_corpus: Path) -> list[str]:
    config = directory / "model.json"
    config.write_text(json.dumps({"d_model": 256, "n_layer": 4, "ssm_cfg": {"layer": "Mamba1"}, "vocab_size": 512,
                                  "pad_vocab_size_multiple": 8, "tie_embeddings": True, "rms_norm": True,
                                  "residual_in_fp32": True, "fused_add_norm": True}))
    return ["--model", str(config), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            str(sentencepiece_model), "--data-path", str(tokenized_corpus), "--split", "90,10,0", "--seq-length", "256",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "8", "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--eval-iters", "1", "--eval-interval", "2", "--num-workers", "1", "--seed", "5"]


def test_resume_on_gpus_with_async_saves_and_from_two_gpus_to_one(tmp_path, sentencepiece_model, tokenized_corpus):
    argv = gpu_training_argv(tmp_path, sentencepiece_model, tokenized_corpus)
    fp32, bf16 = argv + ["--fp32"], argv + ["--bf16"]
    runs = {
        "fp32": fp32,
        "fp32_first": fp32 + ["--save", str(tmp_path / "fp32"), "--exit-interval", "4", "--async-save"],
        "fp32_second": fp32 + ["--load", str(tmp_path / "fp32"), "--save", str(tmp_path / "fp32"), "--async-save"],
        "bf16": bf16,
        "bf16_first": bf16 + ["--save", str(tmp_path / "bf16"), "--exit-interval", "4",
                              "--checkpoint-type", "FULL_STATE_DICT", "--async-save"],
        "bf16_second": bf16 + ["--load", str(tmp_path / "bf16")],
        "signal": {"argv": bf16 + ["--save", str(tmp_path / "signal"), "--save-interval", "2"],
                   "signal": [3, 1, "SIGUSR1"]},
    }
    two = launch(2, runs, tmp_path)
    one = launch(1, {"fp32_from2": fp32 + ["--load", str(tmp_path / "fp32" / "iter_0000004")],
                     "bf16_from2": bf16 + ["--load", str(tmp_path / "bf16")]}, tmp_path)
    report = {
        "fp32 resumed vs uninterrupted (2 GPUs)": max(relative_differences(
            two["fp32_first"]["loss"] + two["fp32_second"]["loss"], two["fp32"]["loss"])),
        "bf16 resumed vs uninterrupted (2 GPUs, FULL)": max(relative_differences(
            two["bf16_first"]["loss"] + two["bf16_second"]["loss"], two["bf16"]["loss"])),
        "fp32 2 GPUs -> 1 GPU": max(relative_differences(two["fp32"]["loss"][4:], one["fp32_from2"]["loss"])),
        "bf16 2 GPUs -> 1 GPU": max(relative_differences(two["bf16"]["loss"][4:], one["bf16_from2"]["loss"])),
    }
    print(json.dumps(report, indent=2))
    assert two["fp32_second"]["iteration"] == [5, 6, 7, 8]
    assert report["fp32 resumed vs uninterrupted (2 GPUs)"] < 1e-4
    assert report["fp32 2 GPUs -> 1 GPU"] < 1e-4
    assert report["bf16 resumed vs uninterrupted (2 GPUs, FULL)"] < 1e-2
    assert report["bf16 2 GPUs -> 1 GPU"] < 2e-2
    assert two["signal"]["iteration"] == [1, 2, 3]
    assert (tmp_path / "signal" / "latest").read_text().strip() == "iter_0000003"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gpus_killed_in_the_middle_of_a_save_resume_from_the_last_complete_checkpoint(
        tmp_path, sentencepiece_model, tokenized_corpus):
    """Both ranks are SIGKILLed while iteration 2's checkpoint is fully written but not yet published
    (rank 0 paused just before the rename, rank 1 waiting for it): the run resumes from iteration 1."""
    argv = gpu_training_argv(tmp_path, sentencepiece_model, tokenized_corpus) + ["--fp32", "--train-iters", "4"]
    save, marker = tmp_path / "run", tmp_path / "paused"
    runs = tmp_path / "killed.json"
    runs.write_text(json.dumps({"killed": {"argv": argv + ["--save", str(save), "--save-interval", "1"],
                                           "pause_before_publish": [2, str(marker)]}}))
    port = str(_free_port())
    processes = []
    for rank in range(2):  # started as torchrun would, so that this test holds both processes' pids
        env = launcher_environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(subprocess.Popen([sys.executable, str(TRAINING_WORKER), str(runs), str(tmp_path / "out.json")],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            for process in processes:
                assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the save never reached its pause"
            time.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process.stderr.close()
    assert (save / ".tmp-iter_0000002" / "state" / ".metadata").is_file()  # written, never published
    assert (save / "latest").read_text().strip() == "iter_0000001"
    results = launch(2, {"uninterrupted": argv,
                         "resumed": argv + ["--save", str(save), "--load", str(save), "--save-interval", "1"]}, tmp_path)
    assert results["resumed"]["iteration"] == [2, 3, 4]
    differences = relative_differences(results["resumed"]["loss"], results["uninterrupted"]["loss"][1:])
    print(json.dumps({"killed mid-save, resumed vs uninterrupted (2 GPUs, fp32)": max(differences)}))
    assert max(differences) < 1e-4
    assert (save / "latest").read_text().strip() == "iter_0000004"
    assert not (save / ".tmp-iter_0000002").exists()  # the debris was removed at start
