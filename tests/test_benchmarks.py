"""The training benchmark's step profile (benchmarks/train_throughput.py --profile) on a CPU."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.train_throughput import StepProfiler, work_events  # noqa: E402


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
