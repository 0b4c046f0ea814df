"""The dry run's peak memory per GPU (`pretrain.py --dry-run`) against torch's measured peak allocation of
the same runs on this GPU (benchmarks/train_throughput.py --plan memory: Mamba-1 and Mamba-2, full and chunked
loss).

    python -m pytest -m gpu tests/gpu/test_memory_estimate_gpu.py -s
"""
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


def test_dry_run_memory_estimate_is_within_10_percent_of_the_measured_peak(tmp_path):
    results = tmp_path / "memory.jsonl"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/train_throughput.py"), "--plan", "memory", "--steps", "2",
         "--warmup", "1", "--case-timeout", "240", "--results", str(results), "--no-report"],
        capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 4 and all(row["result"]["status"] == "ok" for row in rows), rows
    errors = {row["case"]["model"] + " " + row["case"]["options"]:
              row["result"]["estimate_gib"] / row["result"]["peak_gib"] - 1 for row in rows}
    print(json.dumps(errors))
    assert all(abs(error) <= 0.10 for error in errors.values()), errors
