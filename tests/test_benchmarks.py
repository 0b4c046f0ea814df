"""The benchmarks on a CPU: the training benchmark's step profile and runners, the checkpoint benchmark."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.train_throughput import Case, StepProfiler, summarize, work_events  # noqa: E402


def test_annotations_are_not_counted_as_work():
    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("Optimizer.step#AdamW.step"):
            for _ in range(3):
                a @ a
    events = prof.key_averages()
    assert any(e.key == "Optimizer.step#AdamW.step" for e in events)
    kept = {e.key for e in work_events(events, on_gpu=False, time_of=lambda e: e.self_cpu_time_total)}
    assert "aten::mm" in kept and "Optimizer.step#AdamW.step" not in kept


def test_gpu_profile_lists_the_ops_that_take_cpu_time(tmp_path):
    """The GPU layout of the profile, from a CPU profile (its kernel tables are then empty)."""
    profiler = StepProfiler(str(tmp_path), "case", start=1)
    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as profiler.profiler:
        with record_function("Optimizer.step#AdamW.step"):
            a @ a
    profiler._write(wall_ms=12.5, on_gpu=True)
    text = (tmp_path / "case.txt").read_text()
    assert "GPU kernel time 0.0 ms per step (steps of 12.5 ms wall time" in text
    cpu_table = text.split("CPU time (self, per op):")[1]
    assert "`aten::mm`" in cpu_table and "Optimizer.step#" not in cpu_table


def test_profile_of_a_training_step_adds_up(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/train_throughput.py"), "--plan", "tiny", "--only", "chunk-tokens 32",
         "--steps", "1", "--warmup", "1", "--profile", str(tmp_path), "--no-report"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (path,) = tmp_path.glob("kotomamba_tiny_*.txt")
    text = path.read_text()
    total = float(re.search(r"([\d.]+) ms per step", text).group(1))
    categories = re.findall(r"^\| ([a-z /0-9]+) \| ([\d.]+)% \| ([\d.]+) \|$", text, re.M)
    assert {"matmul", "loss / softmax"} <= {name for name, _, _ in categories}
    assert abs(sum(float(ms) for _, _, ms in categories) - total) < 0.01 * total + 0.1 * len(categories)
    assert abs(sum(float(share) for _, share, _ in categories) - 100) < 0.1 * len(categories)
    assert "Optimizer.step#" not in text and "`aten::mm`" in text


def test_plain_loop_runner_times_its_steps_and_warmup_must_be_positive():
    script = str(REPO / "benchmarks/train_throughput.py")
    refused = subprocess.run([sys.executable, script, "--plan", "tiny", "--warmup", "0", "--no-report"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--warmup 0 --steps 10: both must be at least 1" in refused.stderr
    completed = subprocess.run([sys.executable, script, "--plan", "tiny", "--only", "hf", "--steps", "2",
                                "--warmup", "1", "--no-report"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    step_s = float(re.search(r"'step_s': ([\d.]+)", completed.stdout).group(1))
    assert 0 < step_s < 60


def test_checkpoint_benchmark_saves_and_loads_every_checkpoint_type(tmp_path, tiny_mamba1_config):
    """benchmarks/checkpoint_io.py on the tiny model, into a --dir that does not exist yet."""
    target = tmp_path / "not" / "yet"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks/checkpoint_io.py"), "--model", str(tiny_mamba1_config),
                                "--dir", str(target), "--no-write"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["SHARDED_STATE_DICT", "SHARDED_STATE_DICT --async-save",
                                                  "FULL_STATE_DICT", "FULL_STATE_DICT --async-save"]
    for row in rows:
        size_gb = float(row.split("|")[6])
        assert size_gb > 0
    assert target.is_dir() and not any(target.iterdir())  # every case's checkpoint was deleted

    blocked = tmp_path / "file"
    blocked.write_text("")
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks/checkpoint_io.py"), "--dir", str(blocked / "x"),
                              "--no-write"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"--dir {blocked / 'x'}: cannot create it" in refused.stderr


def test_report_compares_rows_of_the_same_run_only():
    """Runs may land on different machines: a peer's ratio and our scaling use our rows of its own run."""
    def row(run, runner, gpus, micro_batch, step_s, options=""):
        return run, Case(runner, "2.8b", gpus, 2048, micro_batch, options), {"status": "ok", "step_s": step_s, "peak_gib": 1.0}

    text = summarize([row(1, "kotomamba", 1, 4, 0.5), row(1, "kotomamba", 1, 8, 0.9), row(1, "recipe", 1, 4, 0.6),
                      row(2, "recipe", 1, 4, 0.3), row(2, "kotomamba", 2, 4, 0.55)], "NVIDIA H200")
    lines = text.splitlines()
    assert lines[0].startswith("| run | runner |") and "(same run)" in lines[0]
    ours_best = 8 * 2048 / 0.9
    recipe_run1 = next(line for line in lines if line.startswith("| 1 | recipe"))
    assert recipe_run1.endswith(f"| {ours_best / (4 * 2048 / 0.6):.2f}× |")
    recipe_run2 = next(line for line in lines if line.startswith("| 2 | recipe"))
    assert recipe_run2.endswith("|  |")  # run 2 has no 1-GPU row of ours
    assert not any("scaling" in line for line in lines)  # 1 and 2 GPUs were measured in different runs

    single = summarize([row(1, "kotomamba", 1, 4, 0.5), row(1, "kotomamba", 2, 4, 0.55)], "NVIDIA H200")
    assert single.splitlines()[0].startswith("| runner |")
    assert f"scaling, 2.8b seq 2048 micro batch 4: {2 * 0.5 / 0.55:.2f}×" in single


def test_report_from_names_the_file_and_line_it_cannot_read(tmp_path):
    script = str(REPO / "benchmarks/train_throughput.py")
    good = '{"case": {"runner": "hf", "model": "130m", "gpus": 1, "seq": 64, "micro_batch": 1, "options": ""}, ' \
           '"result": {"status": "ok", "step_s": 1.0, "peak_gib": 0.0}}'
    results = tmp_path / "run.jsonl"
    for text, expected in ((good + "\n{not json\n", f"--report-from {results}, line 2: not a result record"),
                           ('{"case": 1}\n', f"--report-from {results}, line 1: not a result record"),
                           ("\n", f"--report-from {results}: no results in these files")):
        results.write_text(text)
        refused = subprocess.run([sys.executable, script, "--report-from", str(results)], capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2 and expected in refused.stderr, refused.stderr
    missing = subprocess.run([sys.executable, script, "--report-from", str(tmp_path / "missing.jsonl")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and f"{tmp_path / 'missing.jsonl'}: No such file" in missing.stderr


def test_scan_kernel_benchmark_floors_and_its_refusal_without_a_gpu(capsys):
    from benchmarks import scan_kernels

    # 2.8b at batch 8, seq 2048: 8*5120*2048*16 exponentials per pass; bf16 bytes of each pass's inputs and outputs
    floors = scan_kernels.floors(5120, 8, 2048, bandwidth=3e12, exp_rate=4e12)
    channel, state = 8 * 5120 * 2048, 8 * 16 * 2048
    assert floors["exp_total"] == pytest.approx(2 * channel * 16 / 4e12 * 1e3)
    assert floors["memory_total"] == pytest.approx(2 * (12 * channel + 6 * state) / 3e12 * 1e3)
    assert floors["forward"] == pytest.approx(max(2 * (4 * channel + 2 * state) / 3e12, channel * 16 / 4e12) * 1e3)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            scan_kernels.main(["--models", "2.8b"])
        assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
