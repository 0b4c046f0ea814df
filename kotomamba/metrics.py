"""Training metrics: throughput, MFU, memory, and the one readable log line per --log-interval."""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass
class IntervalMeter:
    """What happened since the last log line: tokens, losses, skips and time spent waiting for data."""

    tokens: int = 0
    data_wait_seconds: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.perf_counter)

    def record(self, loss: float, skipped: bool) -> None:
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1
        self.skipped += int(skipped)

    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else math.nan

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait_seconds += time.perf_counter() - started

    def reset(self) -> None:
        self.__init__()


def peak_memory_gib(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    gib = 1024**3
    return torch.cuda.max_memory_allocated(device) / gib, torch.cuda.max_memory_reserved(device) / gib


def throughput(tokens: int, seconds: float, world_size: int, flops_per_token: float, peak_flops: float | None) -> dict[str, float]:
    """Tokens/s (total and per GPU), achieved TFLOP/s per GPU and MFU (None peak → MFU not reported)."""
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    per_gpu = tokens_per_s / world_size
    tflops = per_gpu * flops_per_token / 1e12
    result = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_gpu, "tflops_per_gpu": tflops}
    if peak_flops:
        result["mfu"] = per_gpu * flops_per_token / peak_flops
    return result
