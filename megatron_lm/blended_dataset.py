"""Several GPT datasets mixed by weight, in Megatron-LM's greedy order."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from megatron_lm import helpers
from megatron_lm.gpt_dataset import (
    INDEX_FORMAT_VERSION,
    ArraySpec,
    DatasetBuildError,
    GPTDataset,
    load_or_build_cached_indices,
)


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum, in float64 as Megatron-LM does it (the blend depends on the bits)."""
    values = np.asarray(weights, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise DatasetBuildError(f"blend weights must be positive finite numbers, got {list(weights)}")
    return (values / values.sum()).tolist()


class BlendedDataset:
    """`size` samples taken from `datasets` in proportion to `weights`.

    `dataset[k]` is the chosen dataset's sample dict plus "dataset_id" (its position in `datasets`).
    """

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        weights: Sequence[float],
        size: int,
        cache_dir: str | None = None,
    ) -> None:
        if not datasets:
            raise DatasetBuildError("a blend needs at least one dataset")
        if len(datasets) != len(weights):
            raise DatasetBuildError(f"a blend of {len(datasets)} datasets got {len(weights)} weights")
        if len(datasets) > np.iinfo(np.int16).max:
            raise DatasetBuildError(f"a blend holds at most 32767 datasets, got {len(datasets)}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise DatasetBuildError(f"blend size must be a non-negative integer, got {size!r}")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.split_name = self.datasets[0].split_name
        description = self._cache_description() if cache_dir is not None else {}
        specs = {
            "dataset_index": ArraySpec((self.size,), (np.dtype(np.int16),)),
            "dataset_sample_index": ArraySpec((self.size,), (np.dtype(np.int64),)),
        }
        arrays = load_or_build_cached_indices(
            cache_dir, f"{type(self).__name__}-{self.split_name}", description, specs, self._build_indices
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._check_no_dataset_runs_dry()

    def _cache_description(self) -> dict:
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "class": type(self).__name__,
            "datasets": [dataset.cache_description() for dataset in self.datasets],
            "weights": self.weights,
            "size": self.size,
        }

    def _build_indices(self) -> dict[str, np.ndarray]:
        dataset_index, dataset_sample_index = helpers.build_blending_indices(self.weights, self.size)
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def _check_no_dataset_runs_dry(self) -> None:
        # Checked on every rank after the cache step, so that all ranks fail together.
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for dataset_id, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                raise DatasetBuildError(
                    f"the {self.split_name} blend takes {count} samples from dataset {dataset_id} "
                    f"({dataset.indexed_dataset.path_prefix}), which has only {len(dataset)}: build that "
                    f"dataset with at least {count} samples (e.g. {math.ceil(count * 1.005)})"
                )

    def __len__(self) -> int:
        return self.size

    def samples_drawn(self, start: int, end: int) -> np.ndarray:
        """How many of the blend's samples start..end-1 come from each dataset."""
        return np.bincount(self.dataset_index[start:end], minlength=len(self.datasets))

    def __getitem__(self, k: int) -> dict[str, np.ndarray | int]:
        if not -self.size <= k < self.size:
            raise IndexError(f"sample {k} out of range for the {self.split_name} blend ({self.size} samples)")
        dataset_id = int(self.dataset_index[k])
        return {"dataset_id": dataset_id, **self.datasets[dataset_id][int(self.dataset_sample_index[k])]}
