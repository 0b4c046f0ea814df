"""Stages of blends one after another over shared datasets (kotomamba's --data-schedule).

Stage s is `size_s` samples blended from its datasets by its weights, in exactly the order Megatron's
BlendedDataset gives those weights and that size. The datasets are shared between stages: a dataset's
samples continue where the previous stages left them, so no stage reads again what an earlier one
read; each dataset is built (GPTDataset) for everything the whole schedule takes from it, so when that
is more than one epoch Megatron's epoch plan repeats and reshuffles it, as for any blend.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_lm import helpers
from megatron_lm.blended_dataset import BlendedDataset, normalize_weights
from megatron_lm.gpt_dataset import DatasetBuildError, GPTDataset


class StagedDataset(BlendedDataset):
    """`stages`: (dataset ids into `datasets`, their weights, the stage's size in samples), in order."""

    def __init__(self, datasets: Sequence[GPTDataset], stages: Sequence[tuple[Sequence[int], Sequence[float], int]],
                 cache_dir: str | None = None) -> None:
        if not stages:
            raise DatasetBuildError("a staged dataset needs at least one stage")
        self.stages = [(tuple(int(i) for i in ids), tuple(normalize_weights(weights)), int(size))
                       for ids, weights, size in stages]
        for ids, weights, size in self.stages:
            if not ids or len(ids) != len(weights) or size < 1 or not all(0 <= i < len(datasets) for i in ids):
                raise DatasetBuildError(f"malformed stage: datasets {ids}, weights {weights}, size {size}")
        self.stage_starts = np.cumsum([0] + [size for _, _, size in self.stages[:-1]]).tolist()
        totals = np.zeros(len(datasets))
        for ids, weights, size in self.stages:
            totals[list(ids)] += np.asarray(weights) * size
        super().__init__(datasets, totals.tolist(), sum(size for _, _, size in self.stages), cache_dir)

    def _cache_description(self) -> dict:
        return {**super()._cache_description(), "stages": [list(map(list, stage[:2])) + [stage[2]]
                                                            for stage in self.stages]}

    def _build_indices(self) -> dict[str, np.ndarray]:
        dataset_index = np.empty(self.size, dtype=np.int16)
        dataset_sample_index = np.empty(self.size, dtype=np.int64)
        consumed = np.zeros(len(self.datasets), dtype=np.int64)  # samples of each dataset the stages so far took
        for start, (ids, weights, size) in zip(self.stage_starts, self.stages):
            local_index, local_sample = helpers.build_blending_indices(weights, size)
            chosen = np.asarray(ids, dtype=np.int16)[local_index]
            dataset_index[start:start + size] = chosen
            dataset_sample_index[start:start + size] = consumed[chosen] + local_sample
            consumed += np.bincount(chosen, minlength=len(self.datasets))
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}
