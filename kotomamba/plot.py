"""Training curves of a run as a PNG: loss (with validation), learning rate, gradient norm, throughput.

    python -m kotomamba.plot train.log -o curves.png              # a run's stdout/stderr log
    python -m kotomamba.plot SAVE_DIR/wandb -o curves.png         # W&B run directories (offline or synced)
    python -m kotomamba.plot TENSORBOARD_DIR -o curves.png        # --tensorboard-dir
    python -m kotomamba.plot SAVE_DIR/metrics.jsonl -o curves.png # what every run with --save writes

A directory is read as W&B when it holds ``*.wandb`` files (every run directory below it, in time order,
so a resumed run's pieces join up), else as TensorBoard when it holds event files. Anything else is a
text log, parsed for the lines ``kotomamba.metrics`` writes. Every reader returns the same metric names.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kotomamba.errors import KotomambaError

Series = dict[str, dict[int, float]]  # metric name -> {iteration: value}


class PlotError(KotomambaError, ValueError):
    """The source cannot be read or holds no metrics; the message names it."""


# ----------------------------------------------------------------------------- text logs

_NUMBER = r"([-+]?(?:[\d,]*\.?\d+(?:e[-+]?\d+)?|nan|inf))"
# One " | "-separated part of a training line -> the metrics its numbers are.
_TRAINING_PARTS = (
    (re.compile(rf"consumed tokens {_NUMBER}"), ("progress/consumed_tokens",)),
    (re.compile(rf"loss {_NUMBER}"), ("train/loss",)),
    (re.compile(rf"ppl {_NUMBER}"), ("train/perplexity",)),
    (re.compile(rf"lr {_NUMBER}"), ("train/lr",)),
    (re.compile(rf"grad norm {_NUMBER}"), ("train/grad_norm",)),
    (re.compile(rf"loss scale {_NUMBER}"), ("train/loss_scale",)),
    (re.compile(rf"{_NUMBER} tokens/s \({_NUMBER} per GPU\)"),
     ("throughput/tokens_per_s", "throughput/tokens_per_s_per_gpu")),
    (re.compile(rf"{_NUMBER} TFLOP/s per GPU"), ("throughput/tflops_per_gpu",)),
    (re.compile(rf"MFU {_NUMBER}%"), ("throughput/mfu_percent",)),
    (re.compile(rf"{_NUMBER} s/iteration"), ("time/iteration_s",)),
)
_TRAINING_LINE = re.compile(r"\biteration (\d+)/\d+ \| (.*)$")
_EVALUATION_LINE = re.compile(r"\b(valid|test) at iteration (\d+) \| (.*)$")
_EVALUATION_PART = re.compile(rf"(?:(\S+) )?loss {_NUMBER} \(ppl \S+\)")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def read_log(path: str | Path) -> Series:
    """Metrics from the training and evaluation lines of a log (other lines are ignored)."""
    series: Series = defaultdict(dict)
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            line = line.rstrip("\n")
            if match := _TRAINING_LINE.search(line):
                step = int(match.group(1))
                for part in match.group(2).split(" | "):
                    for pattern, names in _TRAINING_PARTS:
                        if numbers := pattern.fullmatch(part):
                            for name, value in zip(names, numbers.groups()):
                                series[name][step] = _number(value)
                            break
            elif match := _EVALUATION_LINE.search(line):
                split, step = match.group(1), int(match.group(2))
                for part in match.group(3).split(" | "):
                    if numbers := _EVALUATION_PART.fullmatch(part):
                        component, value = numbers.groups()
                        name = f"{split}/{component}/loss" if component else f"{split}/loss"
                        series[name][step] = _number(value)
    if "throughput/mfu_percent" in series:
        series["throughput/mfu"] = {step: v / 100 for step, v in series.pop("throughput/mfu_percent").items()}
    return dict(series)


# ----------------------------------------------------------------------------- W&B run files

_WANDB_MAGIC = b":W&B"
_WANDB_HEADER = 7  # magic, a 2-byte format mark, a 1-byte version
_BLOCK = 32 * 1024  # records are framed in blocks of this size (LevelDB's log format)
_RECORD_HEADER = struct.Struct("<IHB")  # checksum, length, fragment type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_payloads(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file (a LevelDB-style log of protobuf messages)."""
    data = path.read_bytes()
    if not data.startswith(_WANDB_MAGIC):
        raise PlotError(f"{path} is not a W&B run file (no :W&B header)")
    position, fragments = _WANDB_HEADER, []
    while position + _RECORD_HEADER.size <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _RECORD_HEADER.size:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = _RECORD_HEADER.unpack_from(data, position)
        position += _RECORD_HEADER.size
        payload = data[position:position + length]
        position += length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            fragments = [payload]
        elif kind == _MIDDLE:
            fragments.append(payload)
        elif kind == _LAST:
            yield b"".join(fragments + [payload])


@dataclass
class WandbRunFile:
    config: dict
    history: list[dict]  # one row per step: metric names (and ``_step``) to values
    finished: bool  # the run's exit record is there; W&B may write it shortly after ``finish()`` returns


def read_wandb_file(path: str | Path) -> WandbRunFile:
    """The config and history of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    run = WandbRunFile({}, [], False)
    for payload in _wandb_payloads(Path(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            run.finished = True
    return run


def wandb_files(path: str | Path) -> list[Path]:
    """The ``.wandb`` files at or under `path`, oldest run first (run directories are named by start time)."""
    path = Path(path)
    files = [path] if path.is_file() else list(path.rglob("*.wandb"))
    return sorted(files, key=lambda file: file.parent.name)


def read_wandb(path: str | Path) -> Series:
    series: Series = defaultdict(dict)
    for file in wandb_files(path):
        for row in read_wandb_file(file).history:
            step = row.get("_step")
            for name, value in row.items():
                if not name.startswith("_") and isinstance(value, (int, float)) and step is not None:
                    series[name][int(step)] = float(value)
    return dict(series)


# ----------------------------------------------------------------------------- TensorBoard

def read_tensorboard(path: str | Path) -> Series:
    """Scalars of every event-file directory at or under `path`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    directories = [path] if path.is_file() else sorted({f.parent for f in path.rglob("*tfevents*")})
    series: Series = defaultdict(dict)
    for directory in directories:
        events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                series[tag][event.step] = event.value
    return dict(series)


def read_jsonl(path: str | Path) -> Series:
    """``metrics.jsonl`` as the training run writes it next to its checkpoints (a repeated step: the later value)."""
    series: Series = defaultdict(dict)
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.pop("iteration"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise PlotError(f"{path}:{number}: not a metrics record (a JSON object with an iteration)") from None
            for name, value in record.items():
                if isinstance(value, (int, float)):
                    series[name][step] = float(value)
    return dict(series)


def read_run(path: str | Path) -> Series:
    """Metrics of a run from its log file, W&B directory or TensorBoard directory."""
    path = Path(path)
    if not path.exists():
        raise PlotError(f"{path}: no such file or directory")
    if path.suffix == ".jsonl":
        series = read_jsonl(path)
    elif path.suffix == ".wandb" or (path.is_dir() and wandb_files(path)):
        series = read_wandb(path)
    elif "tfevents" in path.name or (path.is_dir() and any(path.rglob("*tfevents*"))):
        series = read_tensorboard(path)
    elif path.is_dir():
        raise PlotError(f"{path} holds neither W&B run files (*.wandb) nor TensorBoard event files")
    else:
        series = read_log(path)
    if not series:
        raise PlotError(f"{path}: no kotomamba metrics found")
    return series


# ----------------------------------------------------------------------------- drawing

_PANELS = (
    ("loss", (("train/loss", "train"), ("valid/loss", "valid"), ("test/loss", "test"))),
    ("learning rate", (("train/lr", "lr"),)),
    ("gradient norm (before clipping)", (("train/grad_norm", "grad norm"),)),
    ("throughput (tokens/s per GPU)", (("throughput/tokens_per_s_per_gpu", "tokens/s per GPU"),)),
)


def plot_curves(series: Series, output: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for axis, (panel_title, curves) in zip(axes.flat, _PANELS):
        drawn = False
        for name, label in curves:
            points = sorted((step, value) for step, value in series.get(name, {}).items() if math.isfinite(value))
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
                drawn = True
        if drawn and len(curves) > 1:
            axis.legend()
        if not drawn:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(panel_title)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kotomamba.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run's log file, a W&B directory (or .wandb file), or a TensorBoard directory")
    parser.add_argument("-o", "--output", default="curves.png", help="PNG file to write (default curves.png)")
    args = parser.parse_args(argv)
    try:
        series = read_run(args.source)
        plot_curves(series, args.output, str(args.source))
    except (PlotError, OSError) as error:
        print(f"plot: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({len(series)} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
