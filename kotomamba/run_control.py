"""When a run stops before --train-iters: the scheduler's SIGTERM / SIGUSR1, --exit-duration-in-mins and
--exit-interval, decided at each iteration boundary the same on every rank, after saving when --save is
set. The training loop calls :meth:`RunControl.after_iteration` once per iteration; the interval saves
(--save-interval) happen there too, so that a stop and a save of the same iteration are one save.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kotomamba.checkpoint_layout import iteration_dir_name

if TYPE_CHECKING:
    from kotomamba.checkpoint import CheckpointManager
    from kotomamba.state import TrainState

logger = logging.getLogger("kotomamba")

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


# ----------------------------------------------------------------------------------------------
# Exit signals: the scheduler's SIGTERM / SIGUSR1 become a save-and-exit at the next step boundary


class _ExitRequest:
    signum: int | None = None
    started: float | None = None  # time.monotonic() when the run started, for --exit-duration-in-mins


_exit_request = _ExitRequest()


def _on_exit_signal(signum: int, frame: Any) -> None:
    if _exit_request.signum == signum:
        # A second identical signal: the user (or scheduler) insists; die the default way.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _exit_request.signum = signum
    # Only a flag: the loop saves at the next iteration boundary, where every rank agrees to stop.
    logger.warning("received %s: saving and exiting at the end of this iteration", signal.Signals(signum).name)


@contextmanager
def exit_signals_handled() -> Iterator[None]:
    """Within the block, SIGTERM and SIGUSR1 request a save-and-exit instead of killing the process.

    The previous handlers come back afterwards. Outside the main thread (where Python cannot install
    handlers) signals keep their default behaviour.
    """
    _exit_request.signum = None
    _exit_request.started = time.monotonic()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in EXIT_SIGNALS:
            previous[signum] = signal.signal(signum, _on_exit_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _exit_request.signum = None
        _exit_request.started = None


# ----------------------------------------------------------------------------------------------
# The decision at each iteration boundary


class RunControl:
    """Saves at --save-interval and stops the loop early (signal, --exit-*), the same on every rank.

    Every rank calls :meth:`after_iteration` at the same point of the loop: it runs a collective.
    """

    def __init__(self, checkpointer: CheckpointManager, train_iters: int, save_interval: int | None,
                 exit_interval: int | None, exit_duration_in_mins: float | None,
                 host_group: dist.ProcessGroup | None = None) -> None:
        self.checkpointer = checkpointer
        self.train_iters = train_iters
        self.save_interval = save_interval
        self.exit_interval = exit_interval
        self.exit_duration_in_mins = exit_duration_in_mins
        self.exited = False  # the loop stopped before --train-iters (signal or --exit-*)
        self._started = _exit_request.started or time.monotonic()
        # The stop decision every iteration agrees over the CPU (`host_group`, gloo; see
        # kotomamba.distributed.new_host_group): a GPU collective would wait for all the training work
        # queued before it (the optimizer step) instead of letting the next step start.
        self._control_group = host_group

    def after_iteration(self, state: TrainState,
                        pause: Callable[[], AbstractContextManager[object]] = nullcontext,
                        settle: Callable[[], None] = lambda: None) -> bool:
        """Publish a finished background save, save at --save-interval, and decide (the same on every
        rank) whether to stop now: SIGTERM/SIGUSR1 on any rank, --exit-duration-in-mins, --exit-interval.
        Returns True when the loop should stop (after saving, when --save is set). Saving and waiting for
        a save run inside `pause()` (the loop's meter stops its training clock); an iteration with
        nothing to write does not enter it. `settle()` runs first whenever the run saves or stops here:
        the loop brings `state` up to date with the steps whose numbers are still on the device."""
        checkpointer, iteration = self.checkpointer, state.iteration
        over_time = (self.exit_duration_in_mins is not None
                     and time.monotonic() - self._started >= 60 * self.exit_duration_in_mins)
        signum, over_time, busy = self._max_over_ranks(
            [_exit_request.signum or 0, int(over_time), int(checkpointer.background_write_running())])
        if checkpointer.has_unpublished_save() and not busy:
            with pause():
                checkpointer.wait()
        reason = None
        if signum:
            reason = f"{signal.Signals(signum).name} received"
        elif over_time:
            reason = f"--exit-duration-in-mins {self.exit_duration_in_mins:g} reached"
        elif self.exit_interval and iteration % self.exit_interval == 0:
            reason = f"--exit-interval {self.exit_interval}"
        if reason is not None and not signum and iteration >= self.train_iters:
            reason = None  # the run is complete anyway: finish normally (final save, test evaluation)
        saving = checkpointer.save_dir is not None
        saves = saving and (reason is not None or iteration % self.save_interval == 0)
        if saves or reason is not None:
            settle()
        if saves:
            with pause():
                checkpointer.save(state)
        if reason is None:
            return False
        self.exited = True
        if saving:
            with pause():
                checkpointer.wait()
            logger.info("exiting at iteration %d (%s) after saving %s", iteration, reason,
                        checkpointer.save_dir / iteration_dir_name(iteration))
        else:
            logger.warning("exiting at iteration %d (%s) without a checkpoint: no --save", iteration, reason)
        return True

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        if self._control_group is None:
            return values
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._control_group)
        return tensor.tolist()
