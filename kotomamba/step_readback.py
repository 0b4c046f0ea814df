"""A training step's few numbers on their way from the device to the host.

The loop queues a whole step (forward, backward, clipping, the skip decision, AdamW, the loss scale's
update) without reading anything back; :class:`QueuedStep` copies the step's loss, gradient norm, skip
flag and loss scales (and, with --log-loss-per-dataset, each sample's loss sum and target count) into
pinned host memory behind a CUDA event. The loop reads them one iteration later, once it has queued the
next step, so the GPU never idles while the host logs. On CPU the numbers are simply there.
"""
from __future__ import annotations

import torch

from kotomamba.state import StepResult

# The fixed part of the readback vector, in this order; per-sample (loss sum, target count) pairs follow.
STEP_VALUES = ("loss", "grad_norm", "skipped", "loss_scale", "next_loss_scale")


class DeviceReadback:
    """A copy of `values` into host memory that the host waits for only when it reads it."""

    def __init__(self, values: torch.Tensor) -> None:
        self._ready: torch.cuda.Event | None = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = values

    def wait(self) -> torch.Tensor:
        """The values, once the device has produced them (returns at once on CPU)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


class QueuedStep:
    """One queued optimizer step: what the host learns of it, and when.

    All tensors are 0-dim on the training device, except `dataset_sums` ((samples, 2): loss sum and target
    count per sample, float64), whose samples' dataset ids `dataset_ids` the host already has.
    `optimizer_stats` were computed (read back) at the step itself: --optimizer-stats-interval asks for it.
    """

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor, loss_scale: torch.Tensor,
                 next_loss_scale: torch.Tensor, *, data_wait_seconds: float = 0.0,
                 optimizer_stats: dict[str, float] | None = None, dataset_sums: torch.Tensor | None = None,
                 dataset_ids: torch.Tensor | None = None) -> None:
        device = loss.device
        values = [value.to(device, torch.float64).reshape(1)
                  for value in (loss, grad_norm, skipped, loss_scale, next_loss_scale)]
        if dataset_sums is not None:
            values.append(dataset_sums.to(device, torch.float64).reshape(-1))
        self._readback = DeviceReadback(torch.cat(values))
        self.data_wait_seconds = data_wait_seconds
        self.optimizer_stats = optimizer_stats
        self.dataset_ids = dataset_ids

    def result(self) -> StepResult:
        """The step's numbers (waits for the device if it has not finished the step yet)."""
        loss, grad_norm, skipped, loss_scale, next_loss_scale = self._readback.wait()[:len(STEP_VALUES)].tolist()
        return StepResult(loss, grad_norm, bool(skipped), loss_scale, next_loss_scale, self.optimizer_stats)

    def dataset_sums(self) -> torch.Tensor:
        """(samples, 2) float64 on the host: each sample's loss sum and target count, in `dataset_ids` order."""
        return self._readback.wait()[len(STEP_VALUES):].view(-1, 2)
