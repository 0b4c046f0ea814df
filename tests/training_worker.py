"""Runs several pretrain.py configurations in one process group and records each one's per-iteration
losses and grad norms. Started by the tests under torchrun or mpirun (or called in-process):

    torchrun --nproc-per-node 2 tests/training_worker.py RUNS.json RESULTS.json
    mpirun -np 2 python tests/training_worker.py RUNS.json RESULTS.json --use-mpi

RUNS.json is {"name": [pretrain.py arguments...], ...}; rank 0 writes RESULTS.json as
{"name": {"loss": [...], "grad_norm": [...], "skipped": [...], "consumed_samples": n}, ...} or
{"name": {"error": "message"}} when a run raised one of the user-facing errors.

A run may instead be {"argv": [...], ...} with test hooks:
  "signal": [ITERATION, RANK, "SIGTERM"]  that rank sends itself the signal when that iteration is reported
      (which, the loop reporting each iteration once it has queued the next, is during the next one);
  "report_at_once": true  each iteration is reported as soon as it is queued (the loop's schedule before
      step numbers were read back one iteration late), to compare the two;
  "no_host_sync_after": ITERATION  (CUDA) every training step after that one runs under
      torch.cuda.set_sync_debug_mode("error"): anything in it that makes the host wait for the GPU raises;
  "pause_before_publish": [ITERATION, MARKER]  the checkpoint of that iteration, fully written but not
      yet published, creates MARKER and waits there forever (for a test to SIGKILL the process).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kotomamba.config import parse_run_config  # noqa: E402
from kotomamba.distributed import DistributedContext, init_distributed, shutdown_distributed  # noqa: E402


def _pause_before_publish(iteration: int, marker: str) -> None:
    from kotomamba import checkpoint

    publish = checkpoint._publish

    def paused(temporary, final, keep_last_k, publish=publish):
        if final.name == checkpoint.iteration_dir_name(iteration):
            Path(marker).write_text(str(temporary))
            while True:
                time.sleep(1)
        publish(temporary, final, keep_last_k)

    checkpoint._publish = paused


def _report_at_once():
    """Make the loop report every iteration right after queueing it; returns what undoes that."""
    from kotomamba.train import Trainer

    queued_only = Trainer.run_iteration

    def run_iteration(self, state) -> None:
        queued_only(self, state)
        self.report_pending(state)

    Trainer.run_iteration = run_iteration
    return lambda: setattr(Trainer, "run_iteration", queued_only)


def _no_host_sync_after(iteration: int):
    """Training steps after `iteration` (autotuning done) raise where they would wait for the GPU."""
    import torch

    from kotomamba.train import Trainer

    step = Trainer.train_step
    calls = []

    def checked_step(self, **options):
        calls.append(1)
        if len(calls) <= iteration:
            return step(self, **options)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, **options)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    Trainer.train_step = checked_step
    return lambda: setattr(Trainer, "train_step", step)


def run_configurations(runs: dict[str, list[str] | dict], ctx: DistributedContext) -> dict[str, dict]:
    from kotomamba.errors import KotomambaError
    from kotomamba.train import run_training

    results: dict[str, dict] = {}
    for name, spec in runs.items():
        hooks = spec if isinstance(spec, dict) else {"argv": spec}
        record: dict = {"loss": [], "grad_norm": [], "skipped": [], "loss_scale": [], "iteration": []}
        if "pause_before_publish" in hooks:
            _pause_before_publish(*hooks["pause_before_publish"])
        restores = [_report_at_once() if hooks.get("report_at_once") else (lambda: None),
                    _no_host_sync_after(hooks["no_host_sync_after"]) if "no_host_sync_after" in hooks else (lambda: None)]

        def on_step(state, result, record=record, hooks=hooks) -> None:
            record["loss"].append(None if result is None else result.loss)
            record["grad_norm"].append(None if result is None else result.grad_norm)
            record["skipped"].append(result is None or result.skipped)
            record["loss_scale"].append(None if result is None else result.loss_scale)
            record["iteration"].append(state.iteration)
            record["consumed_samples"] = state.consumed_samples
            if "signal" in hooks:
                iteration, rank, signame = hooks["signal"]
                if state.iteration == iteration and ctx.rank == rank:
                    os.kill(os.getpid(), getattr(signal, signame))

        try:
            run_training(parse_run_config(hooks["argv"], ctx.world_size), ctx, on_step)
        except KotomambaError as error:
            record = {"error": str(error)}
        finally:
            for restore in restores:
                restore()
        results[name] = record
    return results


def main() -> None:
    runs_path, results_path, *rest = sys.argv[1:]
    ctx = init_distributed(use_mpi="--use-mpi" in rest)
    completed = False
    try:
        runs = json.loads(Path(runs_path).read_text())
        results = run_configurations(runs, ctx)
        if ctx.rank == 0:
            Path(results_path).write_text(json.dumps(results))
        completed = True
    finally:
        shutdown_distributed(completed)


if __name__ == "__main__":
    main()
