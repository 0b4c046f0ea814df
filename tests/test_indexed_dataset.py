"""Tests for megatron_lm.indexed_dataset: exact bytes, round trips, merging, malformed files, and
interoperability with megatron-core's own reader and writer."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lm.indexed_dataset import (
    DTYPE_BY_CODE,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_token_dtype,
    data_file_path,
    dtype_code,
    index_file_path,
)

# The worked example of docs/megatron-data-format.md, byte by byte.
WORKED_EXAMPLE_IDX = bytes.fromhex(
    "4d4d4944494458 0000"  # magic "MMIDIDX\0\0"
    "0100000000000000"  # version 1
    "08"  # dtype code 8 = uint16
    "0200000000000000"  # S = 2 sequences
    "0300000000000000"  # D' = 3 document-index entries
    "04000000 02000000"  # lengths 4, 2 (int32)
    "0000000000000000 0800000000000000"  # pointers 0, 8 (int64)
    "0000000000000000 0100000000000000 0200000000000000"  # document index 0, 1, 2
)
WORKED_EXAMPLE_BIN = bytes.fromhex("0500 0600 0700 0000 0800 0000")

Documents = list[list[np.ndarray]]


def write_dataset(prefix: Path, documents: Documents, dtype: type) -> None:
    """Write each document sequence by sequence with add_item/end_document."""
    builder = IndexedDatasetBuilder(data_file_path(str(prefix)), dtype)
    for document in documents:
        for sequence in document:
            builder.add_item(sequence)
        builder.end_document()
    builder.finalize(index_file_path(str(prefix)))


def random_tokens(rng: np.random.Generator, dtype: type, size: int) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(size).astype(dtype)
    limits = np.iinfo(dtype)
    return rng.integers(limits.min, limits.max, size=size, endpoint=True, dtype=dtype)


def random_documents(rng: np.random.Generator, dtype: type, count: int) -> Documents:
    """Documents of 0-3 sequences, each 0-40 tokens: covers empty documents and empty sequences."""
    return [
        [random_tokens(rng, dtype, int(rng.integers(0, 41))) for _ in range(int(rng.integers(0, 4)))]
        for _ in range(count)
    ]


def expected_arrays(documents: Documents, itemsize: int) -> tuple[list[int], list[int], list[int]]:
    lengths, pointers, document_index = [], [], [0]
    position = 0
    for document in documents:
        for sequence in document:
            lengths.append(len(sequence))
            pointers.append(position)
            position += len(sequence) * itemsize
        document_index.append(len(lengths))
    return lengths, pointers, document_index


def assert_dataset_holds(dataset: IndexedDataset, documents: Documents, dtype: type) -> None:
    sequences = [sequence for document in documents for sequence in document]
    lengths, pointers, document_index = expected_arrays(documents, np.dtype(dtype).itemsize)
    assert dataset.dtype == np.dtype(dtype)
    assert len(dataset) == len(sequences)
    assert dataset.sequence_lengths.dtype == np.int32
    assert dataset.sequence_lengths.tolist() == lengths
    assert dataset.sequence_pointers.tolist() == pointers
    assert dataset.document_indices.tolist() == document_index
    assert dataset.num_tokens == sum(lengths)
    for number, sequence in enumerate(sequences):
        np.testing.assert_array_equal(dataset[number], sequence)


def file_bytes(prefix: Path) -> tuple[bytes, bytes]:
    return Path(data_file_path(str(prefix))).read_bytes(), Path(index_file_path(str(prefix))).read_bytes()


@pytest.fixture
def worked_example(tmp_path: Path) -> Path:
    prefix = tmp_path / "example"
    write_dataset(prefix, [[np.array([5, 6, 7, 0])], [np.array([8, 0])]], np.uint16)
    return prefix


# ---------------------------------------------------------------- exact bytes


def test_worked_example_bytes(worked_example: Path) -> None:
    bin_bytes, idx_bytes = file_bytes(worked_example)
    assert len(idx_bytes) == 82
    assert idx_bytes == WORKED_EXAMPLE_IDX
    assert bin_bytes == WORKED_EXAMPLE_BIN


def test_add_document_writes_the_same_bytes_as_add_item(tmp_path: Path, worked_example: Path) -> None:
    builder = IndexedDatasetBuilder(str(tmp_path / "doc.bin"), np.uint16)
    builder.add_document([5, 6, 7, 0], [4])
    builder.add_document(np.array([8, 0]), [2])
    builder.finalize(str(tmp_path / "doc.idx"))
    assert file_bytes(tmp_path / "doc") == file_bytes(worked_example)


def test_worked_example_reads_back(worked_example: Path) -> None:
    with IndexedDataset(str(worked_example)) as dataset:
        assert len(dataset) == 2
        assert dataset[0].tolist() == [5, 6, 7, 0]
        assert dataset[-1].tolist() == [8, 0]
        assert dataset[np.int64(1)].tolist() == [8, 0]
        assert dataset.get(0, 1).tolist() == [6, 7, 0]
        assert dataset.get(0, 1, 2).tolist() == [6, 7]
        assert dataset.get(1, 2).tolist() == []
        assert dataset.document_indices.tolist() == [0, 1, 2]
        assert dataset.sequence_modes is None
        assert dataset.path_prefix == str(worked_example)


def test_dtype_codes_and_token_dtype_choice() -> None:
    assert {code: np.dtype(t).name for code, t in DTYPE_BY_CODE.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16",
    }
    for code, dtype in DTYPE_BY_CODE.items():
        assert dtype_code(dtype) == code
        assert dtype_code(np.dtype(dtype)) == code
    with pytest.raises(ValueError, match="complex64"):
        dtype_code(np.complex64)
    with pytest.raises(ValueError, match="no MMIDIDX code"):
        dtype_code(np.dtype(">i4"))  # the format is little-endian only
    assert best_token_dtype(50257) is np.uint16
    assert best_token_dtype(65499) is np.uint16
    assert best_token_dtype(65500) is np.int32
    assert best_token_dtype(None) is np.int32


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", list(DTYPE_BY_CODE.values()), ids=lambda t: np.dtype(t).name)
def test_round_trip_every_dtype(tmp_path: Path, dtype: type) -> None:
    documents = random_documents(np.random.default_rng(dtype_code(dtype)), dtype, 60)
    write_dataset(tmp_path / "data", documents, dtype)
    idx_bytes = Path(index_file_path(str(tmp_path / "data"))).read_bytes()
    assert idx_bytes[17] == dtype_code(dtype)
    with IndexedDataset(str(tmp_path / "data")) as dataset:
        assert_dataset_holds(dataset, documents, dtype)


def test_round_trip_many_documents_and_partial_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    documents = random_documents(rng, np.int32, 2000)
    documents[0] = []  # leading empty document
    documents[-1] = []  # trailing empty document
    write_dataset(tmp_path / "data", documents, np.int32)
    sequences = [sequence for document in documents for sequence in document]
    with IndexedDataset(str(tmp_path / "data")) as dataset:
        assert_dataset_holds(dataset, documents, np.int32)
        for number in rng.integers(0, len(sequences), size=300):
            sequence = sequences[number]
            offset = int(rng.integers(0, len(sequence) + 1))
            length = int(rng.integers(0, len(sequence) - offset + 1))
            expected = sequence[offset : offset + length]
            np.testing.assert_array_equal(dataset.get(number, offset, length), expected)
            np.testing.assert_array_equal(dataset.get(number, offset), sequence[offset:])


def test_documents_of_several_sequences_via_add_document(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    documents = random_documents(rng, np.uint16, 200)
    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), np.uint16)
    for document in documents:
        tokens = np.concatenate(document) if document else []
        builder.add_document(tokens, [len(sequence) for sequence in document])
    builder.finalize(str(tmp_path / "data.idx"))
    with IndexedDataset(str(tmp_path / "data")) as dataset:
        assert_dataset_holds(dataset, documents, np.uint16)


def test_an_idx_beside_another_datasets_longer_bin_is_refused_unless_allowed(tmp_path: Path) -> None:
    """The reported case: `cp good.bin mix.bin; cp other.idx mix.idx` trained without a word."""
    write_dataset(tmp_path / "good", [[np.arange(50)], [np.arange(30)]], np.uint16)
    write_dataset(tmp_path / "other", [[np.arange(10)]], np.uint16)
    shutil.copy(data_file_path(str(tmp_path / "good")), data_file_path(str(tmp_path / "mix")))
    shutil.copy(index_file_path(str(tmp_path / "other")), index_file_path(str(tmp_path / "mix")))
    mix = str(tmp_path / "mix")
    with pytest.raises(IndexedDatasetError) as error:
        IndexedDataset(mix)
    message = str(error.value)
    assert f"{mix}.bin has 160 bytes, but {mix}.idx indexes exactly 20 bytes (1 sequences)" in message
    assert "--data-allow-extra-bin-bytes" in message
    with IndexedDataset(mix, allow_extra_bin_bytes=True) as dataset:  # what Megatron-LM reads
        assert dataset[0].tolist() == list(range(10))
    write_dataset(tmp_path / "empty", [], np.uint16)  # an empty index beside a non-empty .bin: the same
    shutil.copy(data_file_path(str(tmp_path / "good")), data_file_path(str(tmp_path / "empty")))
    with pytest.raises(IndexedDatasetError, match="indexes exactly 0 bytes"):
        IndexedDataset(str(tmp_path / "empty"))


def test_empty_dataset(tmp_path: Path) -> None:
    write_dataset(tmp_path / "empty", [], np.uint16)
    bin_bytes, idx_bytes = file_bytes(tmp_path / "empty")
    assert bin_bytes == b""
    assert len(idx_bytes) == 34 + 8
    with IndexedDataset(str(tmp_path / "empty")) as dataset:
        assert len(dataset) == 0
        assert dataset.document_indices.tolist() == [0]
        assert dataset.num_tokens == 0
        with pytest.raises(IndexError):
            dataset[0]


def test_only_empty_documents(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", [[], [], []], np.uint16)
    with IndexedDataset(str(tmp_path / "data")) as dataset:
        assert len(dataset) == 0
        assert dataset.document_indices.tolist() == [0, 0, 0, 0]


def test_builder_accepts_torch_tensors_and_python_lists(tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), np.uint16)
    builder.add_item(torch.tensor([1, 2, 3], dtype=torch.int64))
    builder.add_item([65535, 0])
    builder.add_item(np.array([7], dtype=np.uint8))
    builder.end_document()
    builder.add_document(torch.tensor([4, 5, 6]), [1, 2])
    builder.finalize(str(tmp_path / "data.idx"))
    with IndexedDataset(str(tmp_path / "data")) as dataset:
        assert [dataset[i].tolist() for i in range(len(dataset))] == [[1, 2, 3], [65535, 0], [7], [4], [5, 6]]
        assert dataset.document_indices.tolist() == [0, 3, 5]


# ---------------------------------------------------------------- merging


def test_add_index_equals_writing_everything_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    documents = random_documents(rng, np.int32, 300)
    parts = [documents[:100], documents[100:101], documents[101:101], documents[101:]]
    for number, part in enumerate(parts):
        write_dataset(tmp_path / f"part{number}", part, np.int32)
    write_dataset(tmp_path / "whole", documents, np.int32)

    builder = IndexedDatasetBuilder(str(tmp_path / "merged.bin"), np.int32)
    for number in range(len(parts)):
        builder.add_index(str(tmp_path / f"part{number}"))
    builder.finalize(str(tmp_path / "merged.idx"))
    assert file_bytes(tmp_path / "merged") == file_bytes(tmp_path / "whole")


def test_add_index_between_own_documents(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    documents = random_documents(rng, np.uint16, 30)
    write_dataset(tmp_path / "middle", documents[10:20], np.uint16)
    write_dataset(tmp_path / "whole", documents, np.uint16)

    builder = IndexedDatasetBuilder(str(tmp_path / "merged.bin"), np.uint16)
    for document in documents[:10]:
        for sequence in document:
            builder.add_item(sequence)
        builder.end_document()
    builder.add_index(str(tmp_path / "middle"))
    for document in documents[20:]:
        builder.add_document(np.concatenate(document) if document else [], [len(s) for s in document])
    builder.finalize(str(tmp_path / "merged.idx"))
    assert file_bytes(tmp_path / "merged") == file_bytes(tmp_path / "whole")


def test_add_index_refuses_another_dtype(tmp_path: Path) -> None:
    write_dataset(tmp_path / "wide", [[np.array([1, 2])]], np.int32)
    builder = IndexedDatasetBuilder(str(tmp_path / "narrow.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"wide\.idx.*int32.*uint16"):
        builder.add_index(str(tmp_path / "wide"))


# ---------------------------------------------------------------- builder errors


def test_builder_refuses_values_that_do_not_fit(tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*70000.*uint16"):
        builder.add_item([1, 70000])
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*-1.*uint16"):
        builder.add_item(torch.tensor([-1, 5]))
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*float64"):
        builder.add_item([1.5, 2.0])
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*1-D"):
        builder.add_item([[1, 2], [3, 4]])
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*sum to 3.*4 tokens"):
        builder.add_document([1, 2, 3, 4], [1, 2])
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*lengths"):
        builder.add_document([1, 2], [3, -1])
    # nothing was written by the refused calls
    builder.add_item([3, 4])
    builder.end_document()
    builder.finalize(str(tmp_path / "data.idx"))
    with IndexedDataset(str(tmp_path / "data")) as dataset:
        assert len(dataset) == 1 and dataset[0].tolist() == [3, 4]


def test_builder_refuses_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*complex128"):
        IndexedDatasetBuilder(str(tmp_path / "data.bin"), np.complex128)


def test_finalize_refuses_an_unfinished_document(tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), np.uint16)
    builder.add_item([1, 2])
    with pytest.raises(IndexedDatasetError, match=r"data\.bin.*end_document\(\)"):
        builder.finalize(str(tmp_path / "data.idx"))
    assert not IndexedDataset.exists(str(tmp_path / "data"))
    builder.end_document()
    builder.finalize(str(tmp_path / "data.idx"))
    assert IndexedDataset.exists(str(tmp_path / "data"))
    with pytest.raises(IndexedDatasetError, match="finalized"):
        builder.add_item([3])


def test_nothing_valid_looking_before_finalize_and_partial_data_discarded(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "data.bin"), np.uint16) as builder:
            builder.add_item([1, 2, 3])
            assert not (tmp_path / "data.bin").exists()
            raise RuntimeError("tokenizer crashed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- malformed files


def patch_bytes(path: str, offset: int, new: bytes) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(new)


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as stream:
        stream.truncate(size)


def corrupt_magic(prefix: str) -> None:
    patch_bytes(index_file_path(prefix), 0, b"X")


def corrupt_version(prefix: str) -> None:
    patch_bytes(index_file_path(prefix), 9, struct.pack("<Q", 2))


def corrupt_dtype_code(prefix: str) -> None:
    patch_bytes(index_file_path(prefix), 17, bytes([9]))


def truncate_header(prefix: str) -> None:
    truncate(index_file_path(prefix), 20)


def truncate_arrays(prefix: str) -> None:
    truncate(index_file_path(prefix), os.path.getsize(index_file_path(prefix)) - 1)


def append_junk_to_index(prefix: str) -> None:
    with open(index_file_path(prefix), "ab") as stream:
        stream.write(b"\x00")  # 1 byte, but a sequence-modes array would be S = 3 bytes


def shorten_data(prefix: str) -> None:
    truncate(data_file_path(prefix), os.path.getsize(data_file_path(prefix)) - 2)


# The fixture below has S = 3 sequences and D' = 3, so the document index starts at 34 + 12·3 = 70.
def document_index_not_from_zero(prefix: str) -> None:
    patch_bytes(index_file_path(prefix), 70, struct.pack("<q", 1))


def document_index_not_to_s(prefix: str) -> None:
    patch_bytes(index_file_path(prefix), 70 + 16, struct.pack("<q", 2))


def document_index_decreasing(prefix: str) -> None:
    patch_bytes(index_file_path(prefix), 70 + 8, struct.pack("<q", 5))


def lengthen_data(prefix: str) -> None:
    with open(data_file_path(prefix), "ab") as data:
        data.write(b"\x00" * 6)


def remove_data(prefix: str) -> None:
    os.remove(data_file_path(prefix))


def remove_index(prefix: str) -> None:
    os.remove(index_file_path(prefix))


MALFORMATIONS = {
    corrupt_magic: (".idx", "magic"),
    corrupt_version: (".idx", "version 2"),
    corrupt_dtype_code: (".idx", "dtype code 9"),
    truncate_header: (".idx", "truncated"),
    truncate_arrays: (".idx", "truncated"),
    append_junk_to_index: (".idx", "1 bytes after the document index"),
    shorten_data: (".bin", "data file has"),
    lengthen_data: (".bin", "has 18 bytes, but"),
    document_index_not_from_zero: (".idx", "starts at 1"),
    document_index_not_to_s: (".idx", "ends at 2"),
    document_index_decreasing: (".idx", "decreases"),
    remove_data: (".bin", "missing"),
    remove_index: (".idx", "missing"),
}


@pytest.mark.parametrize("malform", list(MALFORMATIONS), ids=lambda f: f.__name__)
def test_malformed_files_are_refused(tmp_path: Path, malform) -> None:
    prefix = str(tmp_path / "data")
    write_dataset(Path(prefix), [[np.array([1, 2]), np.array([3])], [np.array([4, 5, 6])]], np.uint16)
    with IndexedDataset(prefix) as dataset:  # valid before the damage
        assert len(dataset) == 3
    malform(prefix)
    suffix, what = MALFORMATIONS[malform]
    with pytest.raises(IndexedDatasetError, match=re.escape(prefix + suffix) + ".*" + re.escape(what)):
        IndexedDataset(prefix)


def test_sequence_modes_present_when_file_size_says_so(tmp_path: Path) -> None:
    prefix = str(tmp_path / "data")
    write_dataset(Path(prefix), [[np.array([1, 2]), np.array([3])], [np.array([4])]], np.uint16)
    with open(index_file_path(prefix), "ab") as stream:
        stream.write(bytes([0, 1, 2]))
    with IndexedDataset(prefix) as dataset:
        assert dataset.sequence_modes.tolist() == [0, 1, 2]
        assert dataset[2].tolist() == [4]


# ---------------------------------------------------------------- reader behaviour


def test_reads_are_zero_copy_read_only_views(worked_example: Path) -> None:
    with IndexedDataset(str(worked_example)) as dataset:
        first, second = dataset[0], dataset.get(0, 1, 2)
        assert not first.flags.owndata and not first.flags.writeable
        assert np.shares_memory(first, second)


def test_index_errors(worked_example: Path) -> None:
    with IndexedDataset(str(worked_example)) as dataset:
        for bad in (2, -3):
            with pytest.raises(IndexError, match=f"sequence {bad} is out of range"):
                dataset[bad]
        with pytest.raises(IndexError, match="outside sequence 0"):
            dataset.get(0, 2, 3)
        with pytest.raises(IndexError, match="outside sequence 1"):
            dataset.get(1, -1)
        with pytest.raises(TypeError):
            dataset[1.0]


def test_close_releases_and_views_stay_valid(worked_example: Path) -> None:
    dataset = IndexedDataset(str(worked_example))
    held = dataset[0]
    dataset.close()
    assert held.tolist() == [5, 6, 7, 0]  # still mapped while the view lives
    with pytest.raises(IndexedDatasetError, match="closed"):
        dataset[0]
    dataset.close()  # idempotent


def test_pickles_by_prefix(worked_example: Path) -> None:
    with IndexedDataset(str(worked_example)) as dataset:
        copy = pickle.loads(pickle.dumps(dataset))
    assert copy[1].tolist() == [8, 0]
    copy.close()


def test_exists(worked_example: Path) -> None:
    assert IndexedDataset.exists(str(worked_example))
    assert not IndexedDataset.exists(str(worked_example) + "x")
    os.remove(data_file_path(str(worked_example)))
    assert not IndexedDataset.exists(str(worked_example))


# ---------------------------------------------------------------- interop with megatron-core


@pytest.fixture(scope="module")
def megatron():
    # megatron-core imports fine on CPU (warns that Transformer Engine / Apex are absent); ~7 s.
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_megatron_core_reads_our_files(tmp_path: Path, megatron) -> None:
    rng = np.random.default_rng(21)
    documents = random_documents(rng, np.uint16, 200)
    documents.append([np.array([1, 2, 3], dtype=np.uint16)])  # megatron-core cannot map an empty .bin
    write_dataset(tmp_path / "ours", documents, np.uint16)
    sequences = [sequence for document in documents for sequence in document]

    theirs = megatron.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(sequences)
    assert theirs.index.dtype == np.uint16
    lengths, pointers, document_index = expected_arrays(documents, 2)
    assert theirs.sequence_lengths.tolist() == lengths
    assert theirs.index.sequence_pointers.tolist() == pointers
    assert theirs.document_indices.tolist() == document_index
    for number, sequence in enumerate(sequences):
        np.testing.assert_array_equal(theirs[number], sequence)
    long_one = max(range(len(sequences)), key=lambda n: len(sequences[n]))
    np.testing.assert_array_equal(theirs.get(long_one, 3, 5), sequences[long_one][3:8])


# megatron-core's own add_document trips a numpy 2 DeprecationWarning on torch tensors; not ours.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_we_read_megatron_core_files_and_write_identical_bytes(tmp_path: Path, megatron, dtype) -> None:
    rng = np.random.default_rng(22)
    documents = random_documents(rng, dtype, 150)
    documents[0] = [np.array([9, 8, 7], dtype=dtype)]

    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for number, document in enumerate(documents):
        if number % 2:  # both of megatron-core's ways of writing a document
            tokens = np.concatenate(document) if document else np.zeros(0, dtype)
            builder.add_document(torch.from_numpy(tokens).long(), [len(s) for s in document])
        else:
            for sequence in document:
                builder.add_item(torch.from_numpy(sequence.astype(np.int64)))
            builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))

    with IndexedDataset(str(tmp_path / "theirs")) as dataset:
        assert_dataset_holds(dataset, documents, dtype)
    write_dataset(tmp_path / "ours", documents, dtype)
    assert file_bytes(tmp_path / "ours") == file_bytes(tmp_path / "theirs")


def test_megatron_core_merge_matches_ours(tmp_path: Path, megatron) -> None:
    rng = np.random.default_rng(23)
    first, second = random_documents(rng, np.uint16, 40), random_documents(rng, np.uint16, 40)
    first[0] = second[0] = [np.array([1], dtype=np.uint16)]
    write_dataset(tmp_path / "first", first, np.uint16)
    write_dataset(tmp_path / "second", second, np.uint16)
    for name, builder_class in (("theirs", megatron.IndexedDatasetBuilder), ("ours", IndexedDatasetBuilder)):
        builder = builder_class(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
        builder.add_index(str(tmp_path / "first"))
        builder.add_index(str(tmp_path / "second"))
        builder.finalize(str(tmp_path / f"{name}.idx"))
    assert file_bytes(tmp_path / "ours") == file_bytes(tmp_path / "theirs")


def test_we_read_megatron_core_multimodal_modes(tmp_path: Path, megatron) -> None:
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.int32, multimodal=True)
    builder.add_item(torch.tensor([1, 2]), mode=0)
    builder.add_item(torch.tensor([3]), mode=1)
    builder.end_document()
    builder.finalize(str(tmp_path / "mm.idx"))
    with IndexedDataset(str(tmp_path / "mm")) as dataset:
        assert dataset.sequence_modes.tolist() == [0, 1]
        assert dataset[1].tolist() == [3]
