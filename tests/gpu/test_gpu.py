"""GPU verification (run on a GPU machine with mamba-ssm's CUDA kernels: `python -m pytest -m gpu tests`).

The CUDA kernels against mamba-ssm's reference functions; 2-GPU FSDP against 1 GPU; the fp16 (V100)
preset against bf16 over 200 steps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from launching import launcher_environment, run_worker, torchrun_command  # noqa: E402


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_cuda_kernels_match_the_reference_functions(name, tmp_path):
    outputs = {}
    for backend, extra in (("cuda", {}), ("reference", {"KOTOMAMBA_KERNEL_BACKEND": "reference"})):
        path = tmp_path / f"{backend}.pt"
        completed = subprocess.run([sys.executable, str(REPO / "tests/gpu/kernel_outputs.py"), name, str(path)],
                                   env=launcher_environment(**extra), capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-4000:]
        outputs[backend] = torch.load(path)
        assert outputs[backend]["backend"] == backend
    cuda, reference = outputs["cuda"], outputs["reference"]
    errors = {"logits": relative_error(cuda["logits"], reference["logits"])}
    errors.update({n: relative_error(cuda["grads"][n], g) for n, g in reference["grads"].items()})
    print(json.dumps({name: {"logits": errors["logits"], "worst_grad": max(errors.values())}}))
    # Mamba-1's kernels match to ~1e-6. Mamba-2's Triton SSD kernels multiply fp32 inputs in TF32
    # (tl.dot's default), which leaves ~1e-4 on the logits and ~2e-3 on the SSM parameters' gradients.
    logits_tolerance, grad_tolerance = (1e-5, 1e-4) if name == "mamba1" else (1e-3, 1e-2)
    assert errors["logits"] < logits_tolerance
    assert max(errors.values()) < grad_tolerance, sorted(errors.items(), key=lambda item: -item[1])[:5]


@pytest.fixture(scope="module")
def gpu_argv(tmp_path_factory, sentencepiece_model, tokenized_corpus) -> list[str]:
    config = tmp_path_factory.mktemp("gpu_model") / "model.json"
    config.write_text(json.dumps({"d_model": 256, "n_layer": 4, "ssm_cfg": {"layer": "Mamba1"},
                                  "vocab_size": 512, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
                                  "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True}))
    return [
        "--model", str(config), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(sentencepiece_model), "--data-path", str(tokenized_corpus),
        "--split", "90,10,0", "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "20", "--eval-iters", "0", "--num-workers", "1",
        "--seed", "5", "--log-interval", "50",
    ]


def launch(nproc: int, runs: dict[str, list[str]], tmp_path: Path) -> dict[str, dict]:
    return run_worker(torchrun_command(nproc), runs, tmp_path, timeout=900, name=f"runs{nproc}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_gpu_in_bf16(gpu_argv, tmp_path):
    runs = {"bf16": gpu_argv + ["--bf16", "--train-iters", "30"]}
    one, two = launch(1, runs, tmp_path)["bf16"], launch(2, runs, tmp_path)["bf16"]
    differences = [abs(a - b) for a, b in zip(one["loss"], two["loss"])]
    print(json.dumps({"max_loss_difference_1_vs_2_gpus": max(differences), "final": [one["loss"][-1], two["loss"][-1]]}))
    assert len(differences) == 30
    assert max(differences) < 0.05  # bf16 reductions in a different order; fp32 master weights


def test_a_training_step_never_makes_the_host_wait_for_the_gpu(gpu_argv, tmp_path):
    """After 3 warm-up steps (Triton autotuning), whole steps under torch.cuda.set_sync_debug_mode("error"):
    bf16, and fp16 with overflows skipped and the loss scale adapting on the device, with gradient
    accumulation. The numbers still arrive, one iteration late."""
    common = ["--train-iters", "10", "--lr-warmup-iters", "2", "--global-batch-size", "16", "--log-interval", "2"]
    fp16 = ["--fp16", "--initial-loss-scale", str(2.0**24), "--hysteresis", "1"]
    runs = {"bf16": {"argv": gpu_argv + ["--bf16", *common], "no_host_sync_after": 3},
            "fp16": {"argv": gpu_argv + [*fp16, *common], "no_host_sync_after": 3},
            # Offloaded gradients live on the CPU, the loss scale on the GPU (this one reads the skip on the host).
            "fp16_offload": gpu_argv + [*fp16, "--fsdp-cpu-offload", *common]}
    results = launch(1, runs, tmp_path)
    for name, result in results.items():
        assert "error" not in result and len(result["loss"]) == 10, (name, result)
        assert not all(result["skipped"]), (name, result["skipped"])  # the scale came down and it trained
    print(json.dumps({name: {"skipped": sum(r["skipped"]), "final_loss": r["loss"][-1]} for name, r in results.items()}))


def test_fp16_preset_trains_200_steps_like_bf16_without_spikes(gpu_argv, tmp_path):
    runs = {p: gpu_argv + [f"--{p}", "--train-iters", "200"] for p in ("bf16", "fp16")}
    results = launch(1, runs, tmp_path)
    bf16, fp16 = results["bf16"], results["fp16"]
    trained = [(i, loss) for i, (loss, skipped) in enumerate(zip(fp16["loss"], fp16["skipped"])) if not skipped]
    skips = sum(fp16["skipped"])
    print(json.dumps({"fp16_skipped": skips, "bf16_final": sum(bf16["loss"][-10:]) / 10,
                      "fp16_final": sum(fp16["loss"][-10:]) / 10}))
    # Overflows: mostly the first steps, while the loss scale comes down from 2**32 (not counted by
    # --max-consecutive-skips: the run must not stop), then at most a few (hysteresis 2 lets one pass).
    first_trained = trained[0][0]
    assert "error" not in fp16 and len(fp16["loss"]) == 200
    assert skips <= 40 and skips - first_trained <= 5, fp16["skipped"]
    # No spike: after warm-up the loss never climbs far above its best so far.
    best = float("inf")
    for i, loss in trained:
        if i > 40:
            assert loss < best + 0.5, f"fp16 loss spike at iteration {i + 1}: {loss} after best {best}"
        best = min(best, loss)
    # The same curve: fp16's last 10 losses against bf16's after as many applied updates (fp16 skipped
    # `skips` steps, so it is that many updates behind).
    fp16_final = sum(fp16["loss"][-10:]) / 10
    bf16_matched = sum(bf16["loss"][-10 - skips:len(bf16["loss"]) - skips]) / 10
    assert abs(fp16_final - bf16_matched) < 0.05 * bf16_matched, (fp16_final, bf16_matched)


def test_chunked_loss_trains_like_the_full_logits_loss(gpu_argv, tmp_path):
    """--cross-entropy-chunk-tokens with the real kernels, bf16 and fp16 (loss scaling): the same curve."""
    runs = {}
    for precision in ("bf16", "fp16"):
        argv = gpu_argv + [f"--{precision}", "--train-iters", "30"]
        runs[precision] = argv
        runs[f"{precision}_chunked"] = argv + ["--cross-entropy-chunk-tokens", "384"]  # 1024 tokens: uneven chunks
    results = launch(1, runs, tmp_path)
    for precision in ("bf16", "fp16"):
        full, chunked = results[precision]["loss"], results[f"{precision}_chunked"]["loss"]
        print(json.dumps({precision: {"first": [full[0], chunked[0]], "last": [full[-1], chunked[-1]]}}))
        assert len(full) == len(chunked) == 30
        assert abs(full[0] - chunked[0]) < 1e-3 * full[0]  # the same weights: only rounding differs
        assert max(abs(a - b) for a, b in zip(full, chunked)) < 0.05
