"""Training metrics: what is measured, under which name, and the one readable log line per --log-interval.

Every metric has one stable name, the same in W&B, TensorBoard and the plotting command
(``python -m kotomamba.plot``); the step is always the iteration (optimizer steps taken, counting from 1
and continuing across resumes). Only rank 0 writes them; the log line goes to stdout.

Every --log-interval iterations (over the iterations since the previous line):

=================================  ====================================================================
name                               meaning
=================================  ====================================================================
train/loss                         mean training loss (cross-entropy, nats/token) of the interval's
                                   steps; steps with a non-finite loss are left out
train/perplexity                   exp(train/loss)
train/lr                           learning rate applied at this iteration
train/grad_norm                    global L2 gradient norm of this iteration, unscaled, before clipping
train/loss_scale                   fp16 loss scale this iteration's backward used (1 without fp16)
train/skipped_steps                steps in the interval skipped for a non-finite loss or gradients
train/skipped_steps_total          the same since the run (and the runs it resumes) started
train/skipped_batches              iterations in the interval skipped by --skip-batch
throughput/tokens_per_s            trained tokens per second, all ranks together
throughput/tokens_per_s_per_gpu    the same per rank (per GPU)
throughput/tflops_per_gpu          model TFLOP/s per GPU (``kotomamba.flops.flops_per_token``)
throughput/mfu                     model FLOPs utilization (0..1) against the GPU's dense peak, or
                                   --peak-tflops; absent (and left out of the log line) when the peak is unknown (CPU)
time/iteration_s                   mean wall time per iteration
time/data_wait_fraction            share of that time spent waiting for the next batch
memory/peak_allocated_gib          peak CUDA memory allocated since the start, max over ranks (GiB);
                                   absent (and left out of the log line) on CPU
memory/peak_reserved_gib           peak CUDA memory reserved by the caching allocator, max over ranks
progress/consumed_tokens           tokens drawn from the training data so far (--skip-batch included)
progress/consumed_samples          samples drawn so far
=================================  ====================================================================

At every --eval-interval (``valid``) and once at the end of training (``test``), for SPLIT in
valid, test: ``SPLIT/loss`` and ``SPLIT/perplexity`` over the whole split, and
``SPLIT/<component>/loss`` and ``SPLIT/<component>/perplexity`` for each component of a blended split,
named after its data prefix's file name (``corpus_text_document``).

Every --optimizer-stats-interval iterations: ``optimizer/<group>/<quantity>/<statistic>``, see
``kotomamba.optimizer_stats``.

Throughput is wall time measured across the whole interval, including data loading and all
communication. The loop reads a step's numbers back from the device only after it has queued the next
step, so the host's clock stops when the interval's last step has finished on the device: the interval
covers its device work without draining the queue. Evaluation (and anything else run under
``IntervalMeter.paused()``, which does synchronize) is excluded from it. Only iterations that ran forward and
backward count as trained tokens; --skip-batch iterations do not.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kotomamba.flops import mfu


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows a float (a diverged run), nan for a nan loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so that a clock read afterwards covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class IntervalMeter:
    """What happened since the last log line: iterations, trained tokens, losses, skips, and time
    (spent waiting for data, and paused for evaluation or checkpointing)."""

    device: torch.device | None = None
    iterations: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    skipped_steps: int = 0
    skipped_batches: int = 0
    data_wait_seconds: float = 0.0
    paused_seconds: float = 0.0
    last_result: Any = None  # the latest training step's result (loss, grad_norm, skipped, loss_scale)
    started: float = field(default_factory=time.perf_counter)

    def record(self, result: Any, tokens: int, data_wait_seconds: float = 0.0) -> None:
        """One iteration that ran forward and backward over `tokens` tokens (its step may be skipped),
        having waited `data_wait_seconds` for its batches."""
        self.iterations += 1
        self.tokens += tokens
        self.data_wait_seconds += data_wait_seconds
        if math.isfinite(result.loss):
            self.loss_sum += result.loss
            self.loss_count += 1
        self.skipped_steps += int(result.skipped)
        self.last_result = result

    def record_skipped_batch(self) -> None:
        """One --skip-batch iteration: data drawn, nothing computed."""
        self.iterations += 1
        self.skipped_batches += 1

    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else math.nan

    def elapsed(self) -> float:
        """Training wall time of the interval, pauses excluded (see the module's note on the clock)."""
        return time.perf_counter() - self.started - self.paused_seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpointing) does not count as training time."""
        synchronize(self.device)  # training work still queued belongs to the interval
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.paused_seconds += time.perf_counter() - started

    def reset(self) -> None:
        self.__init__(device=self.device)


def peak_memory_gib(device: torch.device, host_group: dist.ProcessGroup | None) -> tuple[float, float] | None:
    """Peak (allocated, reserved) CUDA memory since the start in GiB, the maximum over ranks; None on CPU.
    A collective on CUDA: call it on every rank. The maximum is taken on the host, over `host_group`
    (kotomamba.distributed.new_host_group; None for one process), without waiting for the GPU."""
    if device.type != "cuda":
        return None
    peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                         dtype=torch.float64)
    if host_group is not None:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=host_group)
    allocated, reserved = (peaks / 1024**3).tolist()
    return allocated, reserved


def throughput(tokens: int, seconds: float, world_size: int, flops_per_token: float,
               peak_flops: float | None) -> dict[str, float]:
    """Tokens/s (total and per GPU), achieved model TFLOP/s per GPU and, when the peak is known, MFU."""
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    per_gpu = tokens_per_s / world_size
    result = {
        "throughput/tokens_per_s": tokens_per_s,
        "throughput/tokens_per_s_per_gpu": per_gpu,
        "throughput/tflops_per_gpu": per_gpu * flops_per_token / 1e12,
    }
    if peak_flops:
        result["throughput/mfu"] = mfu(per_gpu, flops_per_token, peak_flops)
    return result


def training_metrics(meter: IntervalMeter, *, lr: float, consumed_tokens: int, consumed_samples: int,
                     skipped_steps_total: int, world_size: int, flops_per_token: float,
                     peak_flops: float | None, device: torch.device,
                     host_group: dist.ProcessGroup | None) -> dict[str, float]:
    """The interval's metrics under their stable names (see the table above). Call on every rank
    (the memory figure is reduced across ranks); `meter` must hold at least one training step."""
    elapsed = meter.elapsed()
    loss = meter.mean_loss()
    step = meter.last_result
    values = {
        "train/loss": loss,
        "train/perplexity": perplexity(loss),
        "train/lr": lr,
        "train/grad_norm": step.grad_norm,
        "train/loss_scale": step.loss_scale,
        "train/skipped_steps": meter.skipped_steps,
        "train/skipped_steps_total": skipped_steps_total,
        "train/skipped_batches": meter.skipped_batches,
        **throughput(meter.tokens, elapsed, world_size, flops_per_token, peak_flops),
        "time/iteration_s": elapsed / meter.iterations,
        "time/data_wait_fraction": meter.data_wait_seconds / elapsed if elapsed > 0 else 0.0,
        "progress/consumed_tokens": consumed_tokens,
        "progress/consumed_samples": consumed_samples,
    }
    memory = peak_memory_gib(device, host_group)
    if memory is not None:
        values["memory/peak_allocated_gib"], values["memory/peak_reserved_gib"] = memory
    return values


class RemainingTime:
    """Seconds the run has left, at the pace of its last ``window`` log intervals.

    The first interval (compilation, autotuning, allocator warm-up; 5x slower than the rest on a CPU)
    is dropped as soon as a second one exists, so it does not inflate every later estimate.
    """

    def __init__(self, start_iteration: int, started: float, window: int = 5) -> None:
        self._points: collections.deque[tuple[int, float]] = collections.deque([(start_iteration, started)],
                                                                               maxlen=window + 1)
        self._first_interval_dropped = False

    def update(self, iteration: int, now: float, train_iters: int) -> float:
        self._points.append((iteration, now))
        if not self._first_interval_dropped and len(self._points) > 2:
            self._points.popleft()
            self._first_interval_dropped = True
        first_iteration, first_time = self._points[0]
        return (now - first_time) / max(iteration - first_iteration, 1) * (train_iters - iteration)


def format_training_line(iteration: int, train_iters: int, values: Mapping[str, float],
                         run_seconds: float, remaining_seconds: float) -> str:
    """The human-readable log line for `values` from `training_metrics`; `kotomamba.plot` parses it."""
    # MFU and peak memory only where they exist (a GPU; MFU also needs the peak rate): no "n/a" fields
    mfu = f" | MFU {100 * values['throughput/mfu']:.1f}%" if "throughput/mfu" in values else ""
    memory = ""
    if "memory/peak_allocated_gib" in values:
        memory = f"peak memory {values['memory/peak_allocated_gib']:.1f}/{values['memory/peak_reserved_gib']:.1f} GiB | "
    skipped = f"skipped {values['train/skipped_steps']} (total {values['train/skipped_steps_total']})"
    if values["train/skipped_batches"]:
        skipped += f" | skip-batch {values['train/skipped_batches']}"
    return (
        f"iteration {iteration}/{train_iters} | consumed tokens {values['progress/consumed_tokens']:,} | "
        f"loss {values['train/loss']:.4f} | ppl {values['train/perplexity']:.2f} | lr {values['train/lr']:.3e} | "
        f"grad norm {values['train/grad_norm']:.3f} | loss scale {values['train/loss_scale']:g} | {skipped} | "
        f"{values['throughput/tokens_per_s']:.0f} tokens/s ({values['throughput/tokens_per_s_per_gpu']:.0f} per GPU) | "
        f"{values['throughput/tflops_per_gpu']:.2f} TFLOP/s per GPU{mfu} | "
        f"{values['time/iteration_s']:.3f} s/iteration | data wait {100 * values['time/data_wait_fraction']:.0f}% | "
        f"{memory}elapsed {format_duration(run_seconds)} | remaining {format_duration(remaining_seconds)}"
    )


def blend_component_names(dataset: Any) -> dict[int, str]:
    """Readable names of a blended dataset's components by dataset id: each data prefix's file name,
    with the id in front where two prefixes share a file name. Empty for a dataset that is not a blend."""
    components = getattr(dataset, "datasets", None)
    if not components:
        return {}
    names = [os.path.basename(str(d.indexed_dataset.path_prefix).rstrip("/")) for d in components]
    unique = len(set(names)) == len(names)
    return {i: name if unique else f"{i}-{name}" for i, name in enumerate(names)}


class DataConsumption:
    """Samples, tokens and epochs consumed of each dataset of the training data. The sampler reads the
    dataset in order, so the first `consumed_samples` samples are exactly what was drawn; a blend's index
    says which dataset each came from. Warns once per dataset when it passes one epoch."""

    def __init__(self, dataset: Any, seq_length: int) -> None:
        self.dataset, self.seq_length = dataset, seq_length
        components = getattr(dataset, "datasets", None)
        self.components = list(components) if components else [dataset]
        self.names = blend_component_names(dataset) or {
            0: os.path.basename(str(dataset.indexed_dataset.path_prefix).rstrip("/"))}
        self.counts = [0] * len(self.components)
        self._counted_to = 0
        self._warned: set[int] = set()

    def update(self, consumed_samples: int) -> dict[str, float]:
        """The sinks' `data/<name>/consumed_tokens` and `data/<name>/epochs` after `consumed_samples`."""
        end = min(consumed_samples, len(self.dataset))
        if len(self.components) == 1:
            self.counts = [end]
        else:
            if end < self._counted_to:  # never in one run; recount rather than trust a stale position
                self.counts, self._counted_to = [0] * len(self.components), 0
            drawn = self.dataset.samples_drawn(self._counted_to, end)
            self.counts = [count + int(new) for count, new in zip(self.counts, drawn)]
        self._counted_to = end
        values: dict[str, float] = {}
        for dataset_id, (count, component) in enumerate(zip(self.counts, self.components)):
            name = self.names.get(dataset_id, f"dataset{dataset_id}")
            epochs = count / component.samples_per_epoch
            values[f"data/{name}/consumed_tokens"] = count * self.seq_length
            values[f"data/{name}/epochs"] = epochs
            if epochs > 1 and dataset_id not in self._warned:
                self._warned.add(dataset_id)
                logging.getLogger("kotomamba").warning(
                    "dataset %s has started its second epoch (%d samples of %d per epoch consumed): its text now "
                    "repeats. Megatron's sample order shuffles all the epochs a run needs together, so some "
                    "repeats may have come earlier", name, count, component.samples_per_epoch)
        return values

    def line(self, values: Mapping[str, float]) -> str:
        """`data consumed: NAME 1.23B tokens (0.41 epochs), ...` for the values of `update`."""
        parts = []
        for dataset_id in range(len(self.components)):
            name = self.names.get(dataset_id, f"dataset{dataset_id}")
            tokens, epochs = values[f"data/{name}/consumed_tokens"], values[f"data/{name}/epochs"]
            parts.append(f"{name} {_short_count(tokens)} tokens ({epochs:.2f} epochs)")
        return "data consumed: " + ", ".join(parts)


def _short_count(number: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= scale:
            return f"{number / scale:.2f}{suffix}"
    return f"{number:.0f}"


def evaluation_metrics(split: str, result: Mapping[str, float], component_names: Mapping[int, str]) -> dict[str, float]:
    """`evaluate()`'s result ("loss", "loss/dataset<i>") under stable names: SPLIT/loss,
    SPLIT/perplexity, SPLIT/<component>/loss, SPLIT/<component>/perplexity."""
    values = {f"{split}/loss": result["loss"], f"{split}/perplexity": perplexity(result["loss"])}
    for key, loss in result.items():
        if key.startswith("loss/dataset"):
            dataset_id = int(key.removeprefix("loss/dataset"))
            name = component_names.get(dataset_id, f"dataset{dataset_id}")
            values[f"{split}/{name}/loss"] = loss
            values[f"{split}/{name}/perplexity"] = perplexity(loss)
    return values


def format_evaluation_line(split: str, iteration: int, values: Mapping[str, float]) -> str:
    """E.g. ``valid at iteration 100 | loss 3.2100 (ppl 24.78) | corpus_a loss 3.1000 (ppl 22.20)``;
    `kotomamba.plot` parses it."""
    parts = [f"{split} at iteration {iteration}"]
    for key, loss in values.items():
        if key.endswith("/loss"):
            component = key.removeprefix(f"{split}/").removesuffix("loss").rstrip("/")
            label = f"{component} loss" if component else "loss"
            parts.append(f"{label} {loss:.4f} (ppl {perplexity(loss):.2f})")
    return " | ".join(parts)
