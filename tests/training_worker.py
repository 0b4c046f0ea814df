"""Runs several pretrain.py configurations in one process group and records each one's per-iteration
losses and grad norms. Started by the tests under torchrun or mpirun (or called in-process):

    torchrun --nproc-per-node 2 tests/training_worker.py RUNS.json RESULTS.json
    mpirun -np 2 python tests/training_worker.py RUNS.json RESULTS.json --use-mpi

RUNS.json is {"name": [pretrain.py arguments...], ...}; rank 0 writes RESULTS.json as
{"name": {"loss": [...], "grad_norm": [...], "skipped": [...], "consumed_samples": n}, ...} or
{"name": {"error": "message"}} when a run raised one of the user-facing errors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kotomamba.arguments import parse_args  # noqa: E402
from kotomamba.distributed import DistributedContext, init_distributed, shutdown_distributed  # noqa: E402


def run_configurations(runs: dict[str, list[str]], ctx: DistributedContext) -> dict[str, dict]:
    from kotomamba.errors import USER_ERRORS
    from kotomamba.train import run_training

    results: dict[str, dict] = {}
    for name, argv in runs.items():
        record: dict = {"loss": [], "grad_norm": [], "skipped": [], "loss_scale": []}

        def on_step(state, result, record=record) -> None:
            record["loss"].append(None if result is None else result.loss)
            record["grad_norm"].append(None if result is None else result.grad_norm)
            record["skipped"].append(result is None or result.skipped)
            record["loss_scale"].append(None if result is None else result.loss_scale)
            record["consumed_samples"] = state.consumed_samples

        try:
            run_training(parse_args(argv), ctx, on_step)
        except USER_ERRORS as error:
            record = {"error": str(error)}
        results[name] = record
    return results


def main() -> None:
    runs_path, results_path, *rest = sys.argv[1:]
    ctx = init_distributed(use_mpi="--use-mpi" in rest)
    try:
        runs = json.loads(Path(runs_path).read_text())
        results = run_configurations(runs, ctx)
        if ctx.rank == 0:
            Path(results_path).write_text(json.dumps(results))
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
