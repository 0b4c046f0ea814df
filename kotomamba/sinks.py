"""Where metrics go: the log (stdout) always, and on rank 0 Weights & Biases and/or TensorBoard.

* W&B is on when ``--wandb-project`` is given (``--wandb-entity`` and ``--wandb-name`` refine it). The
  resolved configuration is logged as the run's config. With ``--save DIR`` the run id is kept in
  ``DIR/wandb_run_id``, so a resumed run (same ``--save``) continues the same W&B run; without
  ``--save`` every start is a new run. Run files go under ``$WANDB_DIR``, else ``--save``, else the
  current directory. ``WANDB_MODE=offline`` works as usual (``wandb sync`` uploads later). Steps a
  resumed run repeats (logged after the last checkpoint, before the interruption) keep their first
  values in W&B, which drops steps lower than the run's latest.
* TensorBoard is on with ``--tensorboard-dir DIR``. A resumed run purges the events the interrupted
  run logged after its checkpoint, so curves do not fold back.
* With ``--save DIR`` every metric is also appended to ``DIR/metrics.jsonl`` (one JSON object per log
  line: ``{"iteration": N, name: value, ...}``), and ``DIR/loss_curves.png`` (``kotomamba.plot``'s four
  panels) is drawn again after every evaluation and at the end. A step a resumed run repeats appears
  twice in the file; readers keep the later value. Neither file can stop training: a failure to write
  them is logged once as a warning.

The step of every metric is the iteration; the names are listed in ``kotomamba.metrics``.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kotomamba.config import LoggingSection
from kotomamba.distributed import DistributedContext, raise_on_every_rank
from kotomamba.errors import KotomambaError

logger = logging.getLogger("kotomamba")

WANDB_RUN_ID_FILE = "wandb_run_id"


class MetricsSinkError(KotomambaError, RuntimeError):
    """A metric sink cannot be used as the flags ask (missing package, failed W&B start); names the flag."""


# Rank 0 opens the sinks; what the other ranks raise when it fails.
_FAILED_ON_RANK_0 = "opening the metric sinks (W&B, TensorBoard) failed on rank 0; see its log"


def read_or_create_wandb_run_id(save_dir: str | os.PathLike, new_id: str) -> str:
    """The W&B run id stored in `save_dir`, or `new_id`, stored there first (atomically, so that a
    crash never leaves half an id for the next start to resume)."""
    path = Path(save_dir) / WANDB_RUN_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{WANDB_RUN_ID_FILE}.{os.getpid()}.tmp")
    temporary.write_text(new_id + "\n")
    os.replace(temporary, path)
    return new_id


def _import_wandb(project: str) -> Any:
    try:
        import wandb
    except ImportError:
        raise MetricsSinkError(
            f"--wandb-project {project} needs the wandb package, which is not installed: "
            f"`pip install wandb`, or drop the --wandb-* flags"
        ) from None
    return wandb


class WandbSink:
    def __init__(self, project: str, entity: str | None, name: str | None, config: Mapping[str, Any],
                 save_dir: str | None) -> None:
        wandb = _import_wandb(project)
        # W&B run ids are short lowercase alphanumeric strings; 12 hex digits never repeat in practice.
        run_id = read_or_create_wandb_run_id(save_dir, secrets.token_hex(6)) if save_dir else None
        directory = os.environ.get("WANDB_DIR") or save_dir
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project, entity=entity, name=name, id=run_id, resume="allow" if run_id else None,
                dir=directory,
            )
            # A resumed run may change flags (e.g. a longer --train-iters): the latest values win.
            self.run.config.update(dict(config), allow_val_change=True)
        except Exception as error:  # W&B raises many types (auth, network, usage); all mean the same here
            raise MetricsSinkError(
                f"--wandb-project {project}: wandb.init failed ({type(error).__name__}: {error}); "
                f"set WANDB_MODE=offline to log without a connection"
            ) from error
        logger.info("W&B run %s (%s), files in %s", self.run.id, self.run.name, self.run.dir)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardSink:
    def __init__(self, log_dir: str, config: Mapping[str, Any], start_iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops the events its predecessor logged after the checkpoint it resumes from.
        self.writer = SummaryWriter(log_dir, purge_step=start_iteration + 1 if start_iteration else None)
        text = json.dumps(dict(config), indent=2, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), start_iteration)  # markdown code

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"


class RunFilesSink:
    """``metrics.jsonl`` and ``loss_curves.png`` in the save directory (rank 0); never fatal to training."""

    def __init__(self, save_dir: str) -> None:
        self.metrics_path = Path(save_dir) / METRICS_FILE
        self.curves_path = Path(save_dir) / CURVES_FILE
        self.warned = False

    def _warn_once(self, what: str, error: BaseException) -> None:
        if not self.warned:
            logger.warning("could not write %s (%s: %s); training goes on without it", what, type(error).__name__,
                           error)
            self.warned = True

    def log(self, step: int, values: Mapping[str, float]) -> None:
        try:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a", encoding="utf-8") as file:
                file.write(json.dumps({"iteration": step, **values}) + "\n")
        except OSError as error:
            self._warn_once(str(self.metrics_path), error)
            return
        if any(name.startswith(("valid/", "test/")) for name in values):
            self.draw()

    def draw(self) -> None:
        from kotomamba import plot

        try:
            series = plot.read_run(self.metrics_path)
            temporary = self.curves_path.with_name(f".{self.curves_path.stem}.tmp.png")  # matplotlib goes by the suffix
            plot.plot_curves(series, temporary, str(self.metrics_path.parent))
            temporary.replace(self.curves_path)  # never a half-drawn picture under the final name
        except Exception as error:  # noqa: BLE001 - a picture must never end a training run
            self._warn_once(str(self.curves_path), error)

    def close(self, failed: bool) -> None:
        if self.metrics_path.exists():
            self.draw()


class MetricLogger:
    """Metrics to the log and, on rank 0, to W&B and TensorBoard. A context manager: leaving it closes
    the sinks, marking the W&B run failed when an exception is on its way out.

    Construct it early (the flags and packages are checked then, before an expensive setup) and call
    ``start(iteration)`` before the first iteration, once the configuration is final and a resumed
    run's iteration is known. Every method may be called on every rank.
    """

    def __init__(self, flags: LoggingSection, save_dir: str | None, ctx: DistributedContext) -> None:
        self.flags, self.save_dir = flags, save_dir  # the run files go next to the checkpoints
        self.ctx = ctx
        self.sinks: list[WandbSink | TensorBoardSink | RunFilesSink] = []
        wandb_flags = {"--wandb-entity": flags.wandb_entity, "--wandb-name": flags.wandb_name}
        given = [f"{flag} {value}" for flag, value in wandb_flags.items() if value is not None]
        if given and flags.wandb_project is None:
            raise MetricsSinkError(f"{', '.join(given)} given without --wandb-project: W&B logging needs a project")
        error = None
        if ctx.is_main:
            try:
                if flags.wandb_project is not None:
                    _import_wandb(flags.wandb_project)
                if flags.tensorboard_dir is not None:
                    try:
                        import torch.utils.tensorboard  # noqa: F401
                    except ImportError:
                        raise MetricsSinkError(
                            f"--tensorboard-dir {flags.tensorboard_dir} needs the tensorboard package, which is "
                            f"not installed: `pip install tensorboard`, or drop --tensorboard-dir"
                        ) from None
            except MetricsSinkError as caught:
                error = caught
        raise_on_every_rank(error, MetricsSinkError(_FAILED_ON_RANK_0), ctx.device)

    def start(self, iteration: int, config: Mapping[str, Any]) -> None:
        """Open the sinks on rank 0 for a run that starts after `iteration` completed iterations."""
        error = None
        if self.ctx.is_main:
            flags = self.flags
            if self.save_dir is not None:
                self.sinks.append(RunFilesSink(self.save_dir))
            try:
                if flags.wandb_project is not None:
                    self.sinks.append(WandbSink(
                        flags.wandb_project, flags.wandb_entity, flags.wandb_name, config, self.save_dir,
                    ))
                if flags.tensorboard_dir is not None:
                    try:
                        self.sinks.append(TensorBoardSink(flags.tensorboard_dir, config, iteration))
                    except OSError as caught:
                        raise MetricsSinkError(f"--tensorboard-dir {flags.tensorboard_dir}: {caught}") from caught
            except MetricsSinkError as caught:
                error = caught
        raise_on_every_rank(error, MetricsSinkError(_FAILED_ON_RANK_0), self.ctx.device)

    def log(self, step: int, values: Mapping[str, float], line: str | None = None) -> None:
        """`line` to the log (shown on rank 0), `values` to the sinks at `step` (the iteration)."""
        if line is not None:
            logger.info("%s", line)
        for sink in self.sinks:
            sink.log(step, values)

    def close(self, failed: bool = False) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)
