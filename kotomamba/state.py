"""What one training run carries from iteration to iteration, and what one step reports: shared by the
loop (kotomamba.train) and the checkpoint manager (kotomamba.checkpoint) without either importing the other."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    """Progress counters; everything a resume needs besides model, optimizer and scaler state."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    consecutive_skips: int = 0
    consumed_valid_samples: int = 0  # where the validation stream continues after a resume


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    grad_norm: float  # global L2 norm before clipping, after unscaling
    skipped: bool  # non-finite loss or gradients: the optimizer did not step
    loss_scale: float  # the scale this step's backward used (1 without fp16)
    next_loss_scale: float  # the scale after this step's update (what the next step uses)
    optimizer_stats: dict[str, float] | None = None  # every --optimizer-stats-interval (kotomamba.optimizer_stats)
