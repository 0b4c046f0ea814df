"""Megatron-LM's learning-rate schedule, counted in iterations.

Torch-free, so that the command line (kotomamba.arguments) offers the styles this schedule implements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kotomamba.errors import KotomambaError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


class OptimizerConfigError(KotomambaError, ValueError):
    """A learning-rate schedule or optimizer setting is invalid; the message names the flag."""


@dataclass
class LRSchedule:
    """Megatron-LM's ``OptimizerParamScheduler`` learning rate, counted in iterations.

    ``lr_at(i)`` is the lr for the optimizer step taken when ``i`` steps are already done:
    linear warmup ``warmup_init_lr + (max_lr - warmup_init_lr) * i / warmup_iters`` while
    ``i <= warmup_iters`` (so the very first step uses ``warmup_init_lr``, 0 by default, exactly as
    Megatron); then ``style``:

    * ``constant``: ``max_lr`` forever (Megatron checks this before the ``decay_iters`` cut-off);
    * ``linear`` / ``cosine``: ``min_lr + (max_lr - min_lr) * coeff`` with ratio
      ``(i - warmup_iters) / (decay_iters - warmup_iters)`` and coeff ``1 - ratio`` /
      ``0.5 * (cos(pi * ratio) + 1)``;
    * ``inverse-square-root``: ``max(min_lr, max_lr * sqrt(max(warmup_iters, 1) / max(i, 1)))``;
    * ``WSD``: ``max_lr`` until the last ``wsd_decay_iters`` before ``decay_iters``, then decays
      with ``wsd_decay_style``: ``exponential`` (``2 * 0.5**ratio - 1``), ``linear``, ``cosine`` or
      ``minus_sqrt`` (``1 - sqrt(ratio)``), ratio measured over the last ``wsd_decay_iters``;
    * after ``decay_iters``: ``min_lr``.

    Deliberate difference: Megatron counts steps in samples (iterations x global batch size) when
    the schedule is given in iterations; the ratios are the same as long as the global batch size
    is constant, which kotomamba requires (no batch-size ramp-up). ``wsd_decay_style`` defaults to
    Megatron's ``--lr-wsd-decay-style`` default, ``exponential``.
    """

    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"
    wsd_decay_iters: int | None = None
    wsd_decay_style: str = "exponential"
    warmup_init_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.style.lower() == "wsd":
            self.style = "WSD"
        if self.style not in LR_DECAY_STYLES:
            raise OptimizerConfigError(
                f"--lr-decay-style {self.style!r} is not one of {', '.join(LR_DECAY_STYLES)}"
            )
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise OptimizerConfigError(
                f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.max_lr})"
            )
        if not 0.0 <= self.warmup_init_lr <= self.max_lr:
            raise OptimizerConfigError(
                f"need 0 <= --lr-warmup-init ({self.warmup_init_lr}) <= --lr ({self.max_lr})"
            )
        if self.decay_iters <= 0 or not 0 <= self.warmup_iters < self.decay_iters:
            raise OptimizerConfigError(
                f"need 0 <= --lr-warmup-iters ({self.warmup_iters}) < --lr-decay-iters "
                f"({self.decay_iters})"
            )
        if self.style == "WSD":
            if self.wsd_decay_iters is None or not 0 < self.wsd_decay_iters <= self.decay_iters:
                raise OptimizerConfigError(
                    f"--lr-decay-style WSD needs 0 < --lr-wsd-decay-iters ({self.wsd_decay_iters}) "
                    f"<= --lr-decay-iters ({self.decay_iters})"
                )
            if self.wsd_decay_style not in WSD_DECAY_STYLES:
                raise OptimizerConfigError(
                    f"--lr-wsd-decay-style {self.wsd_decay_style!r} is not one of "
                    f"{', '.join(WSD_DECAY_STYLES)}"
                )

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the step taken after ``iteration`` completed steps."""
        if iteration < 0:
            raise OptimizerConfigError(f"iteration must be >= 0, got {iteration}")
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.warmup_init_lr + (self.max_lr - self.warmup_init_lr) * iteration / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if iteration > self.decay_iters:
            return self.min_lr
        if self.style == "inverse-square-root":
            lr = self.max_lr * math.sqrt(max(self.warmup_iters, 1) / max(iteration, 1))
            return max(self.min_lr, lr)
        decay_ratio = (iteration - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            coeff = 1.0 - decay_ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        else:
            coeff = self._wsd_coeff(iteration)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _wsd_coeff(self, iteration: int) -> float:
        anneal_start = self.decay_iters - self.wsd_decay_iters
        if iteration <= anneal_start:
            return 1.0
        ratio = (iteration - anneal_start) / self.wsd_decay_iters
        if self.wsd_decay_style == "exponential":
            return 2.0 * 0.5**ratio - 1.0
        if self.wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return 1.0 - math.sqrt(ratio)
