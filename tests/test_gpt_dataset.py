"""GPT sample order: C++ sample index, epochs, shuffles, index cache, errors, Megatron-core interop."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

from megatron_lm import helpers
from megatron_lm.gpt_dataset import DatasetBuildError, GPTDataset, GPTDatasetConfig
from megatron_lm.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def write_dataset(prefix: Path, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """One sequence per document, random token ids; returns the sequences."""
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, 60000, size=n).astype(np.uint16) for n in lengths]
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for tokens in sequences:
        builder.add_item(tokens)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return sequences


def reference_samples(
    sequences: list[np.ndarray], ids: range, num_samples: int | None, seq_length: int, seed: int, extra: int
) -> tuple[list[np.ndarray], int, bool]:
    """The doc's "flatten the stream" definition, written independently of megatron_lm.gpt_dataset."""
    tokens_per_epoch = sum(len(sequences[i]) for i in ids)
    epochs = 1
    if num_samples is not None:
        while epochs * tokens_per_epoch < num_samples * seq_length + extra:
            epochs += 1
    separate = False
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - extra) // seq_length
        per_epoch = (tokens_per_epoch - extra) // seq_length
        separate = num_samples - before_final < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)
    if separate:
        leading = np.array(list(ids) * (epochs - 1), dtype=np.int32)
        rng.shuffle(leading)
        final = np.array(list(ids), dtype=np.int32)
        rng.shuffle(final)
        order = np.concatenate([leading, final])
    else:
        order = np.array(list(ids) * epochs, dtype=np.int32)
        rng.shuffle(order)
    stream = np.concatenate([sequences[i] for i in order]).astype(np.int64)
    count = (len(stream) - extra) // seq_length
    if separate:
        first = np.arange(before_final, dtype=np.uint32)
        rng.shuffle(first)
        second = np.arange(before_final, count, dtype=np.uint32)
        rng.shuffle(second)
        shuffle = np.concatenate([first, second])
    else:
        shuffle = np.arange(count, dtype=np.uint32)
        rng.shuffle(shuffle)
    samples = [stream[j * seq_length : j * seq_length + seq_length + extra] for j in shuffle]
    return samples, epochs, separate


CASES = {
    # name: (document lengths, split ids, num_samples, seq_length, extra token, epochs, separate final epoch)
    "one_epoch": ([7, 3, 12, 5, 9, 4, 8, 6], range(0, 8), None, 4, True, 1, False),
    "epochs_not_separate": ([7, 3, 12, 5, 9, 4, 8, 6], range(1, 7), 38, 4, True, 4, False),
    "epochs_separate_final": ([7, 3, 12, 5, 9, 4, 8, 6], range(0, 8), 16, 4, True, 2, True),
    "docs_longer_than_sample": ([40, 25, 61, 33], range(0, 4), 100, 8, True, 6, True),
    "one_token_docs": ([1] * 30, range(0, 30), 26, 3, True, 3, False),
    "empty_and_tiny_docs": ([0, 1, 5, 0, 2, 9, 1, 0], range(0, 8), 9, 2, True, 2, True),
    "no_extra_token": ([7, 3, 12, 5, 9, 4, 8, 6], range(0, 8), 30, 5, False, 3, False),
    "no_extra_token_separate": ([7, 3, 12, 5, 9, 4, 8, 6], range(0, 8), 12, 5, False, 2, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_order_matches_flattened_stream_reference(tmp_path: Path, case: str) -> None:
    lengths, ids, num_samples, seq_length, extra, epochs, separate = CASES[case]
    sequences = write_dataset(tmp_path / "data", lengths)
    config = GPTDatasetConfig(seq_length=seq_length, seed=1234, add_extra_token=extra)
    dataset = GPTDataset(IndexedDataset(str(tmp_path / "data")), "train", ids, num_samples, config)
    expected, expected_epochs, expected_separate = reference_samples(
        sequences, ids, num_samples, seq_length, 1234, int(extra)
    )
    # the case really exercises what its name says
    assert (expected_epochs, expected_separate) == (epochs, separate)
    assert (dataset.plan.num_epochs, dataset.plan.separate_final_epoch) == (epochs, separate)
    assert len(dataset) == len(expected) >= (num_samples or 0)
    for k, sample in enumerate(expected):
        item = dataset[k]
        assert item["tokens"].dtype == np.int64 and len(item["tokens"]) == seq_length
        if extra:
            np.testing.assert_array_equal(item["tokens"], sample[:-1])
            np.testing.assert_array_equal(item["labels"], sample[1:])
        else:
            np.testing.assert_array_equal(item["tokens"], sample)
            np.testing.assert_array_equal(item["labels"][:-1], sample[1:])
            assert item["labels"][-1] == -100


def test_sample_index_dtypes_and_first_row() -> None:
    sizes = np.array([3, 1, 5], dtype=np.int32)
    rows = helpers.build_sample_idx(sizes, np.array([0, 1, 2], dtype=np.int32), 2, 1, 9, True)
    assert rows.dtype == np.int32 and rows.shape == (5, 2)
    # stream positions 0, 2, 4, 6, 8 -> (doc position, offset)
    np.testing.assert_array_equal(rows, [[0, 0], [0, 2], [2, 0], [2, 2], [2, 4]])


def test_sample_index_accepts_unaligned_sizes() -> None:
    buffer = np.zeros(4 * 3 + 2, dtype=np.uint8)
    unaligned = np.frombuffer(buffer.data, dtype=np.int32, count=3, offset=2)
    assert not unaligned.flags.aligned
    buffer[2:14] = np.array([3, 1, 5], dtype="<i4").view(np.uint8)
    rows = helpers.build_sample_idx(unaligned, np.array([0, 1, 2], dtype=np.int32), 2, 1, 9, True)
    assert rows[-1].tolist() == [2, 4]


def test_sample_index_rejects_inconsistent_token_count() -> None:
    sizes = np.array([3, 1], dtype=np.int32)
    with pytest.raises(ValueError, match="runs past the end of the document index"):
        helpers.build_sample_idx(sizes, np.array([0, 1], dtype=np.int32), 2, 1, 40, True)
    with pytest.raises(ValueError, match="outside the 2 sequences"):
        helpers.build_sample_idx(sizes, np.array([0, 7], dtype=np.int32), 2, 1, 6, True)


def test_empty_split_asked_for_samples_is_a_clear_error(tmp_path: Path) -> None:
    write_dataset(tmp_path / "tiny", [5, 6, 7])
    config = GPTDatasetConfig(seq_length=4, seed=1)
    with pytest.raises(DatasetBuildError, match=r"split 'test' .* holds 0 of 3 sequences \(0 tokens\)"):
        GPTDataset(IndexedDataset(str(tmp_path / "tiny")), "test", range(3, 3), 10, config)


def test_out_of_range_sample_and_sequence_ids(tmp_path: Path) -> None:
    write_dataset(tmp_path / "d", [9, 9])
    indexed = IndexedDataset(str(tmp_path / "d"))
    dataset = GPTDataset(indexed, "train", range(0, 2), None, GPTDatasetConfig(seq_length=4, seed=1))
    with pytest.raises(IndexError, match="out of range for the train split"):
        dataset[len(dataset)]
    with pytest.raises(DatasetBuildError, match=r"sequence ids must lie in \[0, 2\)"):
        GPTDataset(indexed, "train", range(0, 3), None, GPTDatasetConfig(seq_length=4, seed=1))


# ---- index cache ----------------------------------------------------------------------------------


def _cached(tmp_path: Path, **overrides) -> GPTDataset:
    settings = dict(seq_length=4, seed=3, num_samples=40)
    settings.update(overrides)
    num_samples = settings.pop("num_samples")
    config = GPTDatasetConfig(cache_dir=str(tmp_path / "cache"), **settings)
    return GPTDataset(IndexedDataset(str(tmp_path / "data")), "train", range(0, 8), num_samples, config)


def _descriptions(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*-description.json"))


def test_cache_is_reused_when_the_key_matches(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [7, 3, 12, 5, 9, 4, 8, 6])
    built = _cached(tmp_path)
    assert not isinstance(built.shuffle_index, np.memmap)
    assert len(list((tmp_path / "cache").iterdir())) == 4  # three arrays + description, no temp files
    loaded = _cached(tmp_path)
    assert isinstance(loaded.shuffle_index, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(built, name), getattr(loaded, name))
    assert len(_descriptions(tmp_path)) == 1


@pytest.mark.parametrize("change", [{"seed": 4}, {"seq_length": 5}, {"num_samples": 41}, {"add_extra_token": False}])
def test_cache_is_rebuilt_when_the_key_changes(tmp_path: Path, change: dict) -> None:
    write_dataset(tmp_path / "data", [7, 3, 12, 5, 9, 4, 8, 6])
    _cached(tmp_path)
    changed = _cached(tmp_path, **change)
    assert not isinstance(changed.shuffle_index, np.memmap)
    assert len(_descriptions(tmp_path)) == 2


def test_cache_is_rebuilt_when_the_data_changes(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [7, 3, 12, 5, 9, 4, 8, 6])
    _cached(tmp_path)
    sequences = write_dataset(tmp_path / "data", [8, 3, 12, 5, 9, 4, 8, 6], seed=1)
    rebuilt = _cached(tmp_path)
    assert not isinstance(rebuilt.shuffle_index, np.memmap)
    expected, _, _ = reference_samples(sequences, range(0, 8), 40, 4, 3, 1)
    np.testing.assert_array_equal(rebuilt.sample_tokens(0), expected[0])


def _corrupt_missing_description(paths: dict) -> None:
    paths["description"].unlink()


def _corrupt_truncated_array(paths: dict) -> None:
    data = paths["sample_index"].read_bytes()
    paths["sample_index"].write_bytes(data[: len(data) // 2])


def _corrupt_wrong_shape(paths: dict) -> None:
    np.save(paths["shuffle_index"], np.arange(3, dtype=np.uint32))


def _corrupt_edited_description(paths: dict) -> None:
    paths["description"].write_text(paths["description"].read_text().replace('"seed": 3', '"seed": 33'))


def _corrupt_missing_array(paths: dict) -> None:
    paths["document_index"].unlink()


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_missing_description, _corrupt_truncated_array, _corrupt_wrong_shape, _corrupt_edited_description,
     _corrupt_missing_array],
)
def test_half_written_cache_is_never_trusted(tmp_path: Path, corrupt) -> None:
    sequences = write_dataset(tmp_path / "data", [7, 3, 12, 5, 9, 4, 8, 6])
    _cached(tmp_path)
    (description,) = _descriptions(tmp_path)
    base = description.name[: -len("-description.json")]
    paths = {"description": description}
    paths.update({name: tmp_path / "cache" / f"{base}-{name}.npy" for name in
                  ("document_index", "sample_index", "shuffle_index")})
    corrupt(paths)
    rebuilt = _cached(tmp_path)
    assert not isinstance(rebuilt.shuffle_index, np.memmap)
    expected, _, _ = reference_samples(sequences, range(0, 8), 40, 4, 3, 1)
    for k in range(len(expected)):
        np.testing.assert_array_equal(rebuilt.sample_tokens(k), expected[k])
    assert isinstance(_cached(tmp_path).shuffle_index, np.memmap)  # the repaired cache is trusted again


# ---- Megatron-core interop ------------------------------------------------------------------------


def _megatron_train_split(prefix: str, cache: Path, num_samples: int | None, seq_length: int, extra: bool, seed: int):
    gpt_module = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    builder_module = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
    tokenizer = types.SimpleNamespace(vocab_size=None, eod=0, pad=-1, unique_identifiers={"class": "stub"})
    config = gpt_module.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="90,8,2",
        path_to_cache=str(cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        add_extra_token_to_sequence=extra,
    )
    sizes = [num_samples, num_samples, num_samples]
    builder = builder_module.BlendedMegatronDatasetBuilder(gpt_module.GPTDataset, sizes, lambda: True, config)
    train, _, _ = builder.build()
    return train


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "num_samples, seq_length, extra, separate_final_epoch",
    [
        (None, 16, True, False),
        (300, 16, True, False),
        (1000, 16, True, False),  # 3 epochs
        (1234, 16, True, True),  # 4 epochs
        (700, 13, False, True),
        (50, 700, True, False),  # samples longer than any document
    ],
)
def test_same_indices_and_samples_as_megatron_core(
    tmp_path: Path, num_samples, seq_length, extra, separate_final_epoch
) -> None:
    rng = np.random.default_rng(5)
    write_dataset(tmp_path / "data", rng.integers(1, 60, size=200).tolist())
    theirs = _megatron_train_split(str(tmp_path / "data"), tmp_path / "megatron", num_samples, seq_length, extra, 11)
    ids = range(int(theirs.indices[0]), int(theirs.indices[-1]) + 1)
    config = GPTDatasetConfig(seq_length=seq_length, seed=11, add_extra_token=extra)
    ours = GPTDataset(IndexedDataset(str(tmp_path / "data")), "train", ids, num_samples, config)
    assert ours.plan.separate_final_epoch == separate_final_epoch
    for name in ("document_index", "sample_index", "shuffle_index"):
        mine, megatron = getattr(ours, name), getattr(theirs, name)
        assert mine.dtype == megatron.dtype, name
        np.testing.assert_array_equal(mine, megatron, err_msg=name)
    assert len(ours) == len(theirs)
    for k in range(len(ours)):
        megatron_tokens, _ = theirs._query_document_sample_shuffle_indices(k)
        np.testing.assert_array_equal(ours.sample_tokens(k), megatron_tokens)


# ---- several ranks --------------------------------------------------------------------------------


def _rank_main(rank: int, workdir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=2)
    try:
        indexed = IndexedDataset(f"{workdir}/data")
        report = {}
        # shared cache dir: rank 0 builds and writes, rank 1 memory-maps what rank 0 wrote
        shared = GPTDataset(indexed, "train", range(0, 8), 40, GPTDatasetConfig(4, 3, cache_dir=f"{workdir}/shared"))
        report["shared_memmap"] = isinstance(shared.shuffle_index, np.memmap)
        # node-local cache dirs: rank 1 finds nothing after the barrier and builds in memory
        local_config = GPTDatasetConfig(4, 3, cache_dir=f"{workdir}/local{rank}")
        local = GPTDataset(indexed, "train", range(0, 8), 40, local_config)
        report["local_memmap"] = isinstance(local.shuffle_index, np.memmap)
        np.save(f"{workdir}/rank{rank}.npy", np.stack([shared.sample_tokens(k) for k in range(len(shared))]))
        np.save(f"{workdir}/rank{rank}-local.npy", np.stack([local.sample_tokens(k) for k in range(len(local))]))
        Path(f"{workdir}/rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_zero_builds_and_other_ranks_memory_map(tmp_path: Path) -> None:
    torch_multiprocessing = pytest.importorskip("torch.multiprocessing")
    sequences = write_dataset(tmp_path / "data", [7, 3, 12, 5, 9, 4, 8, 6])
    torch_multiprocessing.spawn(_rank_main, args=(str(tmp_path),), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert reports[0] == {"shared_memmap": False, "local_memmap": False}
    assert reports[1] == {"shared_memmap": True, "local_memmap": False}
    assert not (tmp_path / "local1").exists()  # only rank 0 writes caches
    expected, _, _ = reference_samples(sequences, range(0, 8), 40, 4, 3, 1)
    for name in ("rank0", "rank1", "rank0-local", "rank1-local"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), np.stack(expected))


def test_missing_extension_says_how_to_build_it() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['megatron_lm._helpers'] = None\n"
        "try:\n    import megatron_lm.helpers\nexcept ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=True).stdout
    assert output.startswith("HelpersNotBuiltError")
    assert f"cd {repo} && pip install -e ." in output and "python setup.py build_ext --inplace" in output
