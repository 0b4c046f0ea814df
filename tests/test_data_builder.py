"""--data-path / --split parsing, per-split sample counts, and building train/valid/test datasets."""
from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest

from megatron_lm.blended_dataset import BlendedDataset
from megatron_lm.data_builder import (
    Blend,
    DataConfig,
    DataConfigError,
    build_train_valid_test_datasets,
    parse_blend,
    parse_split,
    samples_per_split,
    split_ranges,
)
from megatron_lm.gpt_dataset import DatasetBuildError, GPTDataset
from megatron_lm.indexed_dataset import IndexedDatasetBuilder


def write_dataset(prefix: Path, num_documents: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(num_documents):
        builder.add_item(rng.integers(1, 5000, size=int(rng.integers(1, 40))))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize(
    "entries, expected",
    [
        ("/data/a", Blend(["/data/a"], None)),
        (["/data/a", "/data/b"], Blend(["/data/a", "/data/b"], None)),
        ("0.3 /data/a 0.7 /data/b", Blend(["/data/a", "/data/b"], [0.3, 0.7])),
        (["1", "/data/a"], Blend(["/data/a"], [1.0])),
    ],
)
def test_parse_blend(entries, expected: Blend) -> None:
    assert parse_blend(entries) == expected


@pytest.mark.parametrize(
    "entries, message",
    [
        ("0.3 /data/a 0.7", "expected `prefix ...` or `weight prefix"),
        ("/data/a 0.3", "expected `prefix ...` or `weight prefix"),
        ("0 /data/a 1 /data/b", "weights must be positive numbers, got 0.0"),
        ("", "expected one or more dataset prefixes"),
    ],
)
def test_parse_blend_errors_name_the_flag(entries: str, message: str) -> None:
    with pytest.raises(DataConfigError, match=f"--valid-data-path: {message}"):
        parse_blend(entries, "--valid-data-path")


@pytest.mark.parametrize(
    "split, expected",
    [
        ("949,50,1", [0.949, 0.05, 0.001]),
        ("98,2,0", [0.98, 0.02, 0.0]),
        ("1,0,0", [1.0, 0.0, 0.0]),
        ("3,1", [0.75, 0.25, 0.0]),
        ("7", [1.0, 0.0, 0.0]),
    ],
)
def test_parse_split(split: str, expected: list[float]) -> None:
    assert parse_split(split) == pytest.approx(expected)


@pytest.mark.parametrize("split", ["a,b,c", "0,0,0", "1,2,3,4", "5,-1,0", ""])
def test_parse_split_errors(split: str) -> None:
    with pytest.raises(DataConfigError, match="--split"):
        parse_split(split)


def test_split_rounding_halves_to_even_and_zero_width() -> None:
    # bounds 0, 1.5, 4.5, 6 sequences: round(1.5) = 2, round(4.5) = 4
    assert split_ranges([0.25, 0.5, 0.25], 6) == [range(0, 2), range(2, 4), range(4, 6)]
    assert split_ranges([1.0, 0.0, 0.0], 10) == [range(0, 10), None, None]
    # non-zero share that rounds to no sequences: an empty range, not None
    assert split_ranges([0.949, 0.05, 0.001], 100) == [range(0, 95), range(95, 100), range(100, 100)]


def test_samples_per_split_megatron_convention() -> None:
    assert samples_per_split(1000, 100, 10, 8) == (8000, 880, 80)
    assert samples_per_split(5, 10, 0, 4) == (20, 0, 0)
    with pytest.raises(DataConfigError, match="eval_interval >= 1"):
        samples_per_split(10, 0, 1, 1)


def test_single_prefix_builds_one_gpt_dataset_per_split(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 100, 0)
    config = DataConfig(seq_length=8, data_path=str(tmp_path / "a"), split="90,8,2")
    train, valid, test = build_train_valid_test_datasets(config, (50, 10, 0))
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and test is None
    assert train._document_ids_key == {"start": 0, "stop": 90}
    assert valid._document_ids_key == {"start": 90, "stop": 98}
    assert len(train) >= 50 and len(valid) >= 10
    assert train[0]["tokens"].shape == (8,)


def test_tiny_data_with_default_split_names_the_empty_split(tmp_path: Path) -> None:
    write_dataset(tmp_path / "tiny", 10, 0)
    config = DataConfig(seq_length=8, data_path=str(tmp_path / "tiny"), split="949,50,1")
    with pytest.raises(DatasetBuildError, match=r"split 'test' .*tiny holds 0 of 10 sequences"):
        build_train_valid_test_datasets(config, (10, 10, 10))


def test_missing_prefix_is_named(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 20, 0)
    missing = str(tmp_path / "nope")
    config = DataConfig(seq_length=8, data_path=f"1 {tmp_path / 'a'} 1 {missing}", split="1,0,0")
    with pytest.raises(DatasetBuildError, match=f"--data-path: no dataset at prefix '{missing}'"):
        build_train_valid_test_datasets(config, (10, 0, 0))


def test_conflicting_or_missing_data_flags() -> None:
    with pytest.raises(DataConfigError, match="cannot be combined"):
        build_train_valid_test_datasets(DataConfig(8, data_path="a", train_data_path="b"), (1, 1, 1))
    with pytest.raises(DataConfigError, match="no data"):
        build_train_valid_test_datasets(DataConfig(8), (1, 1, 1))


def test_weighted_blend_sizes_follow_megatron(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 60, 0)
    write_dataset(tmp_path / "b", 80, 1)
    config = DataConfig(seq_length=8, data_path=f"30 {tmp_path / 'a'} 70 {tmp_path / 'b'}", split="98,2,0")
    train, valid, test = build_train_valid_test_datasets(config, (333, 7, 5))
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset) and test is None
    for blended, n in [(train, 333), (valid, 7)]:
        targets = [math.ceil(n * 0.3), math.ceil(n * 0.7)]
        assert len(blended) == sum(targets)
        assert [d.num_samples_requested for d in blended.datasets] == [math.ceil(t * 1.005) for t in targets]
    assert {train[k]["dataset_id"] for k in range(len(train))} == {0, 1}


def test_unweighted_blend_uses_dataset_sizes(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 30, 0)
    write_dataset(tmp_path / "b", 50, 1)
    config = DataConfig(seq_length=8, data_path=[str(tmp_path / "a"), str(tmp_path / "b")], split="1,0,0")
    train, valid, test = build_train_valid_test_datasets(config, (40, 10, 10))
    assert valid is None and test is None
    sizes = [len(d) for d in train.datasets]
    assert [d.num_samples_requested for d in train.datasets] == [None, None]
    assert len(train) == min(40, sum(sizes))
    assert train.weights == pytest.approx([s / sum(sizes) for s in sizes])


def test_per_split_paths(tmp_path: Path) -> None:
    for name, seed in [("t1", 0), ("t2", 1), ("v", 2)]:
        write_dataset(tmp_path / name, 40, seed)
    config = DataConfig(
        seq_length=8,
        train_data_path=f"1 {tmp_path / 't1'} 3 {tmp_path / 't2'}",
        valid_data_path=["5", str(tmp_path / "v")],
    )
    train, valid, test = build_train_valid_test_datasets(config, (100, 20, 20))
    assert isinstance(train, BlendedDataset) and test is None
    assert isinstance(valid, GPTDataset)  # a lone per-split prefix is not blended (Megatron-LM too)
    assert valid._document_ids_key == {"start": 0, "stop": 40} and valid.split_name == "valid"
    assert len(train) == math.ceil(100 * 0.25) + math.ceil(100 * 0.75)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("weights", [[0.4, 0.6], None, [1.0]], ids=["weighted", "by_size", "single_weighted"])
def test_blend_matches_megatron_core(tmp_path: Path, weights: list[float] | None) -> None:
    gpt_module = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    builder_module = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
    write_dataset(tmp_path / "a", 70, 0)
    write_dataset(tmp_path / "b", 90, 1)
    prefixes = [str(tmp_path / "a"), str(tmp_path / "b")][: len(weights or [0, 0])]
    data_path = prefixes if weights is None else [f"{w} {p}" for w, p in zip(weights, prefixes)]
    sizes = (400, 30, 12)
    tokenizer = types.SimpleNamespace(vocab_size=None, eod=0, pad=-1, unique_identifiers={"class": "stub"})
    # path_to_cache=None: Megatron then caches GPT indices under each prefix and keeps blends in memory
    megatron_config = gpt_module.GPTDatasetConfig(
        random_seed=9, sequence_length=12, blend=(prefixes, weights), split="90,7,3",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
    )
    theirs = builder_module.BlendedMegatronDatasetBuilder(
        gpt_module.GPTDataset, list(sizes), lambda: True, megatron_config
    ).build()
    config = DataConfig(seq_length=12, seed=9, data_path=" ".join(data_path), split="90,7,3")
    ours = build_train_valid_test_datasets(config, sizes)
    for our_split, their_split in zip(ours, theirs):
        assert isinstance(our_split, BlendedDataset) and len(our_split) == len(their_split)
        np.testing.assert_array_equal(our_split.dataset_index, their_split.dataset_index)
        np.testing.assert_array_equal(our_split.dataset_sample_index, their_split.dataset_sample_index)
        for our_part, their_part in zip(our_split.datasets, their_split.datasets):
            np.testing.assert_array_equal(our_part.shuffle_index, their_part.shuffle_index)
            np.testing.assert_array_equal(our_part.sample_index, their_part.sample_index)
            np.testing.assert_array_equal(our_part.document_index, their_part.document_index)
        for k in range(0, len(our_split), 7):
            np.testing.assert_array_equal(our_split[k]["labels"], their_split[k]["labels"].numpy())


def test_cache_path_is_used_for_every_index(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 40, 0)
    write_dataset(tmp_path / "b", 40, 1)
    config = DataConfig(
        seq_length=8, data_path=f"1 {tmp_path / 'a'} 2 {tmp_path / 'b'}", split="9,1,0", cache_path=str(tmp_path / "c")
    )
    build_train_valid_test_datasets(config, (50, 5, 0))
    train, valid, _ = build_train_valid_test_datasets(config, (50, 5, 0))
    for blended in (train, valid):
        assert isinstance(blended.dataset_index, np.memmap)
        assert all(isinstance(d.shuffle_index, np.memmap) for d in blended.datasets)
    assert len(list((tmp_path / "c").glob("*-description.json"))) == 6  # 2 blends + 4 GPT datasets
