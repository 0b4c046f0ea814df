"""Train/valid/test datasets from Megatron-LM style flags: --data-path, --split, per-split paths.

Mirrors Megatron-core's BlendedMegatronDatasetBuilder so the same flags give the same samples:
- one prefix without a weight: a GPTDataset per split;
- `w1 p1 w2 p2 ...` (even a single `1.0 p1`): each prefix asked for ceil(ceil(N*w)*1.005) samples,
  blended to sum_i ceil(N*w_i) samples;
- several prefixes without weights: one epoch of each, blended by their sample counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from megatron_lm.blended_dataset import BlendedDataset, normalize_weights
from megatron_lm.gpt_dataset import DatasetBuildError, GPTDataset, GPTDatasetConfig
from megatron_lm.indexed_dataset import IndexedDataset
from megatron_lm.staged_dataset import StagedDataset
from kotomamba.errors import KotomambaError

SPLIT_NAMES = ("train", "valid", "test")
# Megatron-core's mid_level_dataset_surplus: headroom so the blend never runs a dataset dry.
BLEND_SURPLUS = 0.005


class DataConfigError(KotomambaError, ValueError):
    """A data flag (--data-path, --split, per-split paths, sample counts) is malformed."""


@dataclass(frozen=True)
class Blend:
    prefixes: list[str]
    weights: list[float] | None  # None: unweighted (one prefix, or blend by dataset size)


@dataclass
class DataConfig:
    seq_length: int
    seed: int = 1234
    data_path: Sequence[str] | str | None = None
    split: str = "969,30,1"
    train_data_path: Sequence[str] | str | None = None
    valid_data_path: Sequence[str] | str | None = None
    test_data_path: Sequence[str] | str | None = None
    cache_path: str | None = None  # --data-cache-path; None keeps indices in memory
    add_extra_token: bool = True
    allow_extra_bin_bytes: bool = False  # --data-allow-extra-bin-bytes: see IndexedDataset
    # --data-schedule: (prefixes, weights, training samples) per stage, in order; instead of the paths above
    stages: Sequence[tuple[Sequence[str], Sequence[float], int]] | None = None


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(entries: Sequence[str] | str, flag: str = "--data-path") -> Blend:
    """`prefix`, `p1 p2 ...` or `w1 p1 w2 p2 ...` (a string is split on whitespace)."""
    tokens = entries.split() if isinstance(entries, str) else [str(entry).strip() for entry in entries]
    if not tokens or any(not token for token in tokens):
        raise DataConfigError(f"{flag}: expected one or more dataset prefixes, got {entries!r}")
    numeric = [_as_float(token) is not None for token in tokens]
    if not any(numeric):
        return Blend(prefixes=tokens, weights=None)
    pairs_ok = len(tokens) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2])
    if not pairs_ok:
        raise DataConfigError(
            f"{flag}: expected `prefix ...` or `weight prefix weight prefix ...`, got {' '.join(tokens)!r}"
        )
    weights = [float(token) for token in tokens[0::2]]
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise DataConfigError(f"{flag}: weights must be positive numbers, got {bad[0]} in {' '.join(tokens)!r}")
    return Blend(prefixes=tokens[1::2], weights=weights)


def parse_split(split: str) -> list[float]:
    """`"949,50,1"` (or fewer numbers, padded with zeros) as fractions that sum to 1."""
    parts = [part.strip() for part in split.replace("/", ",").split(",")]
    values = [_as_float(part) for part in parts]
    if len(parts) > 3 or any(v is None or not math.isfinite(v) or v < 0 for v in values):
        raise DataConfigError(f"--split: expected up to three non-negative numbers like '949,50,1', got {split!r}")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise DataConfigError(f"--split: the numbers must not all be zero, got {split!r}")
    return [v / total for v in values]


def split_ranges(fractions: Sequence[float], num_sequences: int) -> list[range | None]:
    """Sequence ids of each split; None where the split's share is zero. Same rounding as Megatron-LM
    (Python round, halves to even, on cumulative float bounds)."""
    bounds = [0.0]
    for fraction in fractions:
        bounds.append(bounds[-1] + fraction)
    ranges: list[range | None] = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        if high <= low:
            ranges.append(None)
        else:
            ranges.append(range(int(round(low * float(num_sequences))), int(round(high * float(num_sequences)))))
    return ranges


def samples_per_split(
    train_iters: int, eval_interval: int, eval_iters: int, global_batch_size: int
) -> tuple[int, int, int]:
    """Samples each split must supply over a run, as Megatron-LM requests them."""
    if train_iters < 0 or eval_iters < 0 or eval_interval < 1 or global_batch_size < 1:
        raise DataConfigError(
            f"need train_iters >= 0, eval_iters >= 0, eval_interval >= 1, global_batch_size >= 1; got "
            f"{train_iters}, {eval_iters}, {eval_interval}, {global_batch_size}"
        )
    train = train_iters * global_batch_size
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    test = eval_iters * global_batch_size
    return train, valid, test


class _Builder:
    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.dataset_config = GPTDatasetConfig(
            seq_length=config.seq_length,
            seed=config.seed,
            add_extra_token=config.add_extra_token,
            cache_dir=config.cache_path,
        )
        self._opened: dict[str, IndexedDataset] = {}

    def open(self, prefix: str, flag: str) -> IndexedDataset:
        if prefix not in self._opened:
            if not IndexedDataset.exists(prefix):
                raise DatasetBuildError(f"{flag}: no dataset at prefix {prefix!r} (need {prefix}.idx and {prefix}.bin)")
            self._opened[prefix] = IndexedDataset(prefix, allow_extra_bin_bytes=self.config.allow_extra_bin_bytes)
        return self._opened[prefix]

    def gpt(self, prefix: str, flag: str, split: int, ids: range, num_samples: int | None) -> GPTDataset:
        indexed = self.open(prefix, flag)
        return GPTDataset(indexed, SPLIT_NAMES[split], ids, num_samples, self.dataset_config)

    def split_dataset(
        self, blend: Blend, flag: str, split: int, fractions: Sequence[float], num_samples: int
    ) -> GPTDataset | BlendedDataset | None:
        """The dataset of one split drawn from `blend`; `fractions` picks each prefix's share."""
        def ids_of(prefix: str) -> range | None:
            return split_ranges(fractions, len(self.open(prefix, flag)))[split]

        if blend.weights is None and len(blend.prefixes) == 1:
            ids = ids_of(blend.prefixes[0])
            return None if ids is None else self.gpt(blend.prefixes[0], flag, split, ids, num_samples)
        if blend.weights is None:
            datasets = [self.gpt(p, flag, split, ids_of(p), None) for p in blend.prefixes]
            sizes = [len(dataset) for dataset in datasets]
            return BlendedDataset(datasets, sizes, min(num_samples, sum(sizes)), self.config.cache_path)
        weights = normalize_weights(blend.weights)
        targets = [math.ceil(num_samples * weight) for weight in weights]
        datasets = [
            self.gpt(prefix, flag, split, ids_of(prefix), math.ceil(target * (1 + BLEND_SURPLUS)))
            for prefix, target in zip(blend.prefixes, targets)
        ]
        return BlendedDataset(datasets, weights, sum(targets), self.config.cache_path)

    def staged_datasets(self, num_samples: tuple[int, int, int]) -> tuple[StagedDataset | BlendedDataset | None, ...]:
        """Training: the stages one after another (the last one runs on to `num_samples[0]`); validation
        and test: every dataset of the schedule, blended by its share of the whole run's training."""
        stages = [(list(prefixes), list(weights), int(size)) for prefixes, weights, size in self.config.stages]
        prefixes, weights, size = stages[-1]
        stages[-1] = (prefixes, weights, size + max(0, num_samples[0] - sum(size for _, _, size in stages)))
        prefixes = list(dict.fromkeys(prefix for stage_prefixes, _, _ in stages for prefix in stage_prefixes))
        fractions = parse_split(self.config.split)
        shares, needed = [0.0] * len(prefixes), [0] * len(prefixes)  # of the whole run; samples to build
        for stage_prefixes, weights, size in stages:
            for prefix, weight in zip(stage_prefixes, normalize_weights(weights)):
                shares[prefixes.index(prefix)] += weight * size
                needed[prefixes.index(prefix)] += math.ceil(size * weight)
        flag = "--data-schedule"
        if fractions[0] == 0:
            raise DataConfigError(f"--split {self.config.split} leaves nothing for training")
        components = [self.gpt(prefix, flag, 0, split_ranges(fractions, len(self.open(prefix, flag)))[0],
                               math.ceil(count * (1 + BLEND_SURPLUS))) for prefix, count in zip(prefixes, needed)]
        train = StagedDataset(components, [([prefixes.index(p) for p in stage_prefixes], weights, size)
                                           for stage_prefixes, weights, size in stages], self.config.cache_path)
        overall = Blend(prefixes, shares)
        evaluation = [None if fractions[split] == 0 or num_samples[split] == 0 else
                      self.split_dataset(overall, flag, split, fractions, num_samples[split]) for split in (1, 2)]
        return (train, *evaluation)


def build_train_valid_test_datasets(
    config: DataConfig, train_valid_test_num_samples: tuple[int, int, int]
) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """(train, valid, test); None for a split with no data, a zero share, or zero samples requested."""
    if len(train_valid_test_num_samples) != 3 or any(n < 0 for n in train_valid_test_num_samples):
        raise DataConfigError(f"need three sample counts >= 0, got {train_valid_test_num_samples}")
    per_split_paths = (config.train_data_path, config.valid_data_path, config.test_data_path)
    if config.data_path and any(per_split_paths):
        raise DataConfigError(
            "--data-path cannot be combined with --train-data-path/--valid-data-path/--test-data-path"
        )
    if config.stages:
        return _Builder(config).staged_datasets(train_valid_test_num_samples)
    if not config.data_path and not any(per_split_paths):
        raise DataConfigError("no data: give --data-path, or --train-data-path (and --valid/--test-data-path)")
    builder = _Builder(config)
    results: list[GPTDataset | BlendedDataset | None] = []
    if config.data_path:
        blend = parse_blend(config.data_path, "--data-path")
        fractions = parse_split(config.split)
        for split, num_samples in enumerate(train_valid_test_num_samples):
            if fractions[split] == 0 or num_samples == 0:
                results.append(None)
            else:
                results.append(builder.split_dataset(blend, "--data-path", split, fractions, num_samples))
        return tuple(results)
    for split, (paths, num_samples) in enumerate(zip(per_split_paths, train_valid_test_num_samples)):
        flag = f"--{SPLIT_NAMES[split]}-data-path"
        if not paths or num_samples == 0:
            results.append(None)
            continue
        blend = parse_blend(paths, flag)
        whole = [0.0, 0.0, 0.0]
        whole[split] = 1.0
        if len(blend.prefixes) == 1:  # Megatron-LM ignores a lone prefix's weight here
            blend = Blend(blend.prefixes, None)
        results.append(builder.split_dataset(blend, flag, split, whole, num_samples))
    return tuple(results)
