"""Starting the multi-process test workers (training_worker.py and friends) under torchrun or mpirun:
the environment they need, the torchrun command, and one launch that returns rank 0's results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINING_WORKER = REPO / "tests" / "training_worker.py"


def launcher_environment(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable, one thread per process (2 ranks share 2 cores)
    and Python stacks on a fatal signal."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a worker that aborts in C++ still shows where its Python threads were
    env.update(extra)
    return env


def torchrun_command(nproc: int, *options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *options]


def run_worker(command: list[str], spec: dict, directory: Path, worker: Path = TRAINING_WORKER,
               timeout: int = 600, name: str = "runs") -> dict:
    """Run `worker SPEC RESULTS` under the launcher `command` and return the results rank 0 wrote."""
    spec_path, results_path = directory / f"{name}.json", directory / f"{name}_results.json"
    spec_path.write_text(json.dumps(spec))
    mpi = ["--use-mpi"] if "mpirun" in command[0] else []
    completed = subprocess.run(command + [str(worker), str(spec_path), str(results_path)] + mpi,
                               env=launcher_environment(), capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return json.loads(results_path.read_text())
