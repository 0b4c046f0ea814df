"""Greedy blend index (C++), BlendedDataset samples and cache, Megatron-core's blend for comparison."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_lm import helpers
from megatron_lm.blended_dataset import BlendedDataset
from megatron_lm.gpt_dataset import DatasetBuildError, GPTDataset, GPTDatasetConfig
from megatron_lm.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def reference_blend(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """The doc's greedy rule, in plain Python."""
    counts = [0] * len(weights)
    chosen, within = [], []
    for position in range(size):
        progress = max(position, 1)
        errors = [w * progress - c for w, c in zip(weights, counts)]
        best = errors.index(max(errors))  # first maximum: ties go to the lowest index
        chosen.append(best)
        within.append(counts[best])
        counts[best] += 1
    return chosen, within


def test_blend_example_from_the_format_doc() -> None:
    dataset_index, sample_index = helpers.build_blending_indices([0.5, 0.25, 0.25], 4)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    assert dataset_index.tolist() == [0, 1, 2, 0]
    assert sample_index.tolist() == [0, 0, 0, 1]


def test_ties_go_to_the_lowest_index() -> None:
    dataset_index, sample_index = helpers.build_blending_indices([0.5, 0.5], 6)
    assert dataset_index.tolist() == [0, 1, 0, 1, 0, 1]
    assert sample_index.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("seed", range(5))
def test_blend_matches_python_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.random(int(rng.integers(1, 8))) + 0.01
    weights = (raw / raw.sum()).tolist()
    size = int(rng.integers(0, 3000))
    dataset_index, sample_index = helpers.build_blending_indices(weights, size)
    expected_index, expected_within = reference_blend(weights, size)
    assert dataset_index.tolist() == expected_index
    assert sample_index.tolist() == expected_within


def test_blend_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="1 to 32767 entries"):
        helpers.build_blending_indices([], 3)
    with pytest.raises(ValueError, match="size must be >= 0"):
        helpers.build_blending_indices([1.0], -1)


def test_same_blend_as_megatron_core() -> None:
    megatron_helpers = pytest.importorskip("megatron.core.datasets.helpers")
    rng = np.random.default_rng(0)
    for num_datasets, size in [(3, 4), (2, 1000), (7, 12345), (1, 10)]:
        raw = rng.random(num_datasets) + 0.05
        weights = (raw / raw.sum()).tolist()
        theirs_index = np.zeros(size, dtype=np.int16)
        theirs_within = np.zeros(size, dtype=np.int64)
        megatron_helpers.build_blending_indices(theirs_index, theirs_within, weights, num_datasets, size, False)
        ours_index, ours_within = helpers.build_blending_indices(weights, size)
        np.testing.assert_array_equal(ours_index, theirs_index)
        np.testing.assert_array_equal(ours_within, theirs_within)


# ---- BlendedDataset ---------------------------------------------------------------------------------


def _gpt_datasets(tmp_path: Path, cache_dir: str | None = None, num_samples=(60, 30)) -> list[GPTDataset]:
    rng = np.random.default_rng(1)
    datasets = []
    for i, n in enumerate(num_samples):
        prefix = tmp_path / f"data{i}"
        builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
        for _ in range(20):
            builder.add_item(rng.integers(1, 5000, size=int(rng.integers(1, 30))))
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
        config = GPTDatasetConfig(seq_length=8, seed=5, cache_dir=cache_dir)
        datasets.append(GPTDataset(IndexedDataset(str(prefix)), "train", range(0, 20), n, config))
    return datasets


def test_blended_items_come_from_the_chosen_dataset(tmp_path: Path) -> None:
    datasets = _gpt_datasets(tmp_path)
    blended = BlendedDataset(datasets, [2, 1], 90)
    expected_index, expected_within = reference_blend([2 / 3, 1 / 3], 90)
    assert len(blended) == 90
    for k in range(len(blended)):
        item = blended[k]
        assert item["dataset_id"] == expected_index[k]
        expected = datasets[expected_index[k]][expected_within[k]]
        np.testing.assert_array_equal(item["tokens"], expected["tokens"])
        np.testing.assert_array_equal(item["labels"], expected["labels"])
    with pytest.raises(IndexError, match="out of range for the train blend"):
        blended[90]


def test_blend_that_oversamples_a_dataset_is_an_error(tmp_path: Path) -> None:
    datasets = _gpt_datasets(tmp_path, num_samples=(None, None))
    too_many = 2 * len(datasets[1]) + 10
    with pytest.raises(DatasetBuildError, match=r"takes \d+ samples from dataset 1 .*data1.*which has only"):
        BlendedDataset(datasets, [1, 1], too_many)


def test_blend_rejects_bad_weights(tmp_path: Path) -> None:
    datasets = _gpt_datasets(tmp_path)
    with pytest.raises(DatasetBuildError, match="positive finite"):
        BlendedDataset(datasets, [1, 0], 10)
    with pytest.raises(DatasetBuildError, match="2 datasets got 3 weights"):
        BlendedDataset(datasets, [1, 1, 1], 10)


def test_blend_cache_reused_and_keyed_by_weights_and_size(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    datasets = _gpt_datasets(tmp_path, cache_dir=cache)
    first = BlendedDataset(datasets, [2, 1], 50, cache_dir=cache)
    assert not isinstance(first.dataset_index, np.memmap)
    again = BlendedDataset(datasets, [2, 1], 50, cache_dir=cache)
    assert isinstance(again.dataset_index, np.memmap)
    np.testing.assert_array_equal(first.dataset_sample_index, again.dataset_sample_index)
    for weights, size in [([1, 1], 50), ([2, 1], 51)]:
        changed = BlendedDataset(datasets, weights, size, cache_dir=cache)
        assert not isinstance(changed.dataset_index, np.memmap)
    assert len(list(Path(cache).glob("*BlendedDataset-train-description.json"))) == 3
    # a blend over differently built datasets is a different key too
    reseeded = [GPTDataset(d.indexed_dataset, "train", range(0, 20), 60, GPTDatasetConfig(8, 6, cache_dir=cache))
                for d in datasets]
    assert not isinstance(BlendedDataset(reseeded, [2, 1], 50, cache_dir=cache).dataset_index, np.memmap)


def test_consumption_counts_what_the_sampler_drew_and_warns_at_a_second_epoch(tmp_path: Path, caplog) -> None:
    import itertools
    import logging

    from kotomamba.data import build_loader
    from kotomamba.metrics import DataConsumption

    datasets = _gpt_datasets(tmp_path)
    blended = BlendedDataset(datasets, [2, 1], 90)
    consumption = DataConsumption(blended, seq_length=8)
    drawn = [0, 0]
    global_batches = 14  # 2 ranks x micro batch 3 = 6 samples per step
    for rank in (0, 1):
        loader = build_loader(blended, 0, micro_batch_size=3, dp_rank=rank, dp_size=2, num_workers=0, pin_memory=False)
        for batch in itertools.islice(loader, global_batches):
            for dataset_id in batch["dataset_id"].tolist():
                drawn[dataset_id] += 1
    with caplog.at_level(logging.WARNING, logger="kotomamba"):
        consumption.update(20)  # counted in two steps, as the log interval does
        values = consumption.update(global_batches * 6)
    assert consumption.counts == drawn and sum(drawn) == 84
    assert values["data/data0/consumed_tokens"] == drawn[0] * 8
    epochs = [count / dataset.samples_per_epoch for count, dataset in zip(drawn, datasets)]
    assert values["data/data1/epochs"] == pytest.approx(epochs[1])
    past_one_epoch = [name for name, e in zip(("data0", "data1"), epochs) if e > 1]
    assert past_one_epoch and past_one_epoch == [
        name for name in ("data0", "data1") if f"dataset {name} has started its second epoch" in caplog.text]
    assert caplog.text.count("second epoch") == len(past_one_epoch)  # once each
    assert "data consumed: data0 " in consumption.line(values) and "epochs)" in consumption.line(values)
