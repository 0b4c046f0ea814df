"""``--data-schedule FILE.yaml``: a run's training data as stages of data mixtures, one after another.

The file lists the stages in order; each has a blend (weights and dataset prefixes, as ``--data-path``
takes them) and a length in tokens, samples or iterations::

    stages:
      - name: web                 # optional (default: stage1, stage2, ...)
        tokens: 60e9              # or samples: N, or iterations: N (of the global batch)
        blend: 0.85 ja_web_text_document 0.15 en_wiki_text_document
      - name: balanced
        tokens: 60e9
        blend: [0.4, ja_web_text_document, 0.4, en_wiki_text_document, 0.2, math_text_document]

Stage lengths become samples (tokens / --seq-length, rounded up; iterations x global batch), so the
boundaries stay where they are when the world size or the global batch changes on resume. The run's
length is the sum of the stages (the last one runs on to the end of the last iteration). How the
samples are drawn: megatron_lm.staged_dataset. Torch-free: the configuration reads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kotomamba.arguments import ArgumentError, parse_blend, read_yaml_file

LENGTH_KEYS = ("tokens", "samples", "iterations")


@dataclass(frozen=True)
class Stage:
    """One stage: `samples` training samples drawn from `prefixes` in proportion to `weights`."""

    name: str
    prefixes: tuple[str, ...]
    weights: tuple[float, ...]
    samples: int


def _length(value: Any, key: str, where: str) -> int:
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ArgumentError(f"{where}: {key} {value!r} is not a number") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 1 \
            or number != int(number):
        raise ArgumentError(f"{where}: {key} must be a whole number of at least 1 (e.g. 60e9), got {value!r}")
    return int(number)


def _stage(entry: Any, position: int, path: str, seq_length: int, global_batch_size: int) -> Stage:
    where = f"--data-schedule {path}: stage {position}"
    if not isinstance(entry, dict):
        raise ArgumentError(f"{where}: expected a mapping with 'blend' and one of {', '.join(LENGTH_KEYS)}, "
                            f"got {entry!r}")
    name = str(entry.get("name", f"stage{position}"))
    where += f" ({name})"
    unknown = sorted(set(entry) - {"name", "blend", *LENGTH_KEYS})
    if unknown:
        raise ArgumentError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a stage has name, blend "
                            f"and one of {', '.join(LENGTH_KEYS)}")
    lengths = [key for key in LENGTH_KEYS if key in entry]
    if len(lengths) != 1:
        raise ArgumentError(f"{where}: give its length as exactly one of {', '.join(LENGTH_KEYS)}, got "
                            f"{', '.join(lengths) or 'none'}")
    key = lengths[0]
    length = _length(entry[key], key, where)
    samples = {"tokens": -(-length // seq_length), "samples": length, "iterations": length * global_batch_size}[key]
    if "blend" not in entry:
        raise ArgumentError(f"{where}: no blend (weights and dataset prefixes, as --data-path takes them)")
    blend = entry["blend"]
    words = blend.split() if isinstance(blend, str) else [str(word) for word in blend] if isinstance(blend, list) \
        else None
    if not words:
        raise ArgumentError(f"{where}: blend must be a string or a list of weights and prefixes, got {blend!r}")
    prefixes, weights = parse_blend(words, f"{where}: blend")
    if weights is None:
        if len(prefixes) > 1:
            raise ArgumentError(f"{where}: blend lists {len(prefixes)} datasets without weights; give WEIGHT PREFIX "
                                f"pairs (a stage's shares are its own, not the datasets' sizes)")
        weights = [1.0]
    if len(set(prefixes)) != len(prefixes):
        raise ArgumentError(f"{where}: blend names a dataset twice")
    kept = [(prefix, weight) for prefix, weight in zip(prefixes, weights) if weight > 0]
    return Stage(name, tuple(p for p, _ in kept), tuple(w for _, w in kept), samples)


def load_data_schedule(path: str, seq_length: int, global_batch_size: int) -> tuple[Stage, ...]:
    """The stages of `path`; ArgumentError naming the file, the stage and the key for anything malformed."""
    data = read_yaml_file(path, "--data-schedule")
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ArgumentError(f"--data-schedule {path}: expected a mapping with a non-empty list 'stages', got "
                            f"{type(data).__name__}")
    if isinstance(data, dict) and set(data) - {"stages"}:
        raise ArgumentError(f"--data-schedule {path}: unknown top-level key(s) "
                            f"{', '.join(map(repr, sorted(set(data) - {'stages'})))}; only 'stages'")
    result = tuple(_stage(entry, position, path, seq_length, global_batch_size)
                   for position, entry in enumerate(stages, start=1))
    names = [stage.name for stage in result]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ArgumentError(f"--data-schedule {path}: stage name(s) {', '.join(map(repr, duplicates))} used twice")
    return result


def schedule_prefixes(stages: tuple[Stage, ...]) -> list[str]:
    """Every dataset of the schedule, in order of first appearance."""
    return list(dict.fromkeys(prefix for stage in stages for prefix in stage.prefixes))


def stage_at(stages: tuple[Stage, ...], sample: int) -> int:
    """The index of the stage that training sample `sample` belongs to (the last one past the end)."""
    end = 0
    for index, stage in enumerate(stages):
        end += stage.samples
        if sample < end:
            return index
    return len(stages) - 1
