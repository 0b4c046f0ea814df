"""Megatron-LM compatible indexed dataset: token sequences in a `.bin` file described by an `.idx` file.

The format ("MMIDIDX" version 1) is restated in docs/megatron-data-format.md. Reading memory-maps
both files and hands out read-only zero-copy views; writing streams tokens to a temporary `.bin`,
keeps the per-sequence numbers in compact arrays, and writes the index with numpy in one go.
"""
from __future__ import annotations

import array
import mmap
import operator
import os
import struct
from types import TracebackType
from typing import Any

import numpy as np

from kotomamba.errors import KotomambaError

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
# magic, version, token dtype code, sequence count S, document-index length D'; 34 bytes, no padding
_HEADER = struct.Struct("<9sQBQQ")
_INT32_MAX = np.iinfo(np.int32).max
_COPY_CHUNK_BYTES = 64 << 20
_WRITE_BUFFER_BYTES = 8 << 20

DTYPE_BY_CODE: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
# Keyed by little-endian dtypes: the format is little-endian whatever the host is.
_CODE_BY_DTYPE = {np.dtype(t).newbyteorder("<"): code for code, t in DTYPE_BY_CODE.items()}


class IndexedDatasetError(KotomambaError, ValueError):
    """A `.bin`/`.idx` pair that cannot be read or written; the message names the file."""


def dtype_code(dtype: Any) -> int:
    """The MMIDIDX code of a token dtype (numpy type, dtype or name); ValueError if it has none."""
    try:
        resolved = None if dtype is None else np.dtype(dtype)  # np.dtype(None) would be float64
    except TypeError:
        resolved = None
    if resolved in _CODE_BY_DTYPE:
        return _CODE_BY_DTYPE[resolved]
    supported = ", ".join(np.dtype(t).name for t in DTYPE_BY_CODE.values())
    described = dtype if resolved is None else f"{resolved.name} ({resolved.str})"
    raise ValueError(f"token dtype {described} has no MMIDIDX code (supported: little-endian {supported})")


def best_token_dtype(vocab_size: int | None) -> type:
    """The token dtype Megatron writes for a vocabulary: uint16 when it fits (< 65500), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def _temporary_path(path: str) -> str:
    return f"{path}.{os.getpid()}.tmp"


def _map_read_only(path: str, role: str) -> tuple[mmap.mmap | None, Any]:
    """Memory-map `path` read-only; returns (map, buffer). Empty files cannot be mapped, so they
    get no map and an empty buffer."""
    if not os.path.isfile(path):
        raise IndexedDatasetError(f"{path}: {role} file is missing")
    try:
        with open(path, "rb") as stream:
            if os.fstat(stream.fileno()).st_size == 0:
                return None, b""
            mapping = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise IndexedDatasetError(f"{path}: cannot open {role} file: {error.strerror}") from None
    return mapping, mapping


class IndexedDataset:
    """Read-only, memory-mapped view of a `.bin`/`.idx` pair. Validates the index on open.

    Items are numpy views into the mapped `.bin` (zero-copy, read-only). `close()` (or leaving a
    `with` block) drops the maps; views already handed out stay valid until they are freed.
    """

    def __init__(self, path_prefix: str, allow_extra_bin_bytes: bool = False) -> None:
        """``allow_extra_bin_bytes``: accept a .bin longer than its index says (Megatron-LM reads such a pair
        without a check); by default the .bin must be exactly as long as Megatron's writer makes it."""
        self.path_prefix = path_prefix
        self.allow_extra_bin_bytes = allow_extra_bin_bytes
        self._idx_map: mmap.mmap | None = None
        self._bin_map: mmap.mmap | None = None
        self._bin_buffer: Any = None
        self._num_tokens: int | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        idx_path = index_file_path(self.path_prefix)
        bin_path = data_file_path(self.path_prefix)
        self._idx_map, idx_buffer = _map_read_only(idx_path, "index (.idx)")
        self._bin_map, self._bin_buffer = _map_read_only(bin_path, "data (.bin)")
        idx_size = len(idx_buffer)
        if idx_size < _HEADER.size:
            raise IndexedDatasetError(
                f"{idx_path}: truncated index: {idx_size} bytes, less than the {_HEADER.size}-byte header"
            )
        magic, version, code, sequence_count, document_entries = _HEADER.unpack_from(idx_buffer, 0)
        if magic != _MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: not an MMIDIDX index: magic bytes {magic!r}, expected {_MAGIC!r}"
            )
        if version != _VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version}, expected {_VERSION}")
        if code not in DTYPE_BY_CODE:
            raise IndexedDatasetError(
                f"{idx_path}: unknown token dtype code {code} (known: {sorted(DTYPE_BY_CODE)})"
            )
        arrays_end = _HEADER.size + 12 * sequence_count + 8 * document_entries
        if idx_size < arrays_end:
            raise IndexedDatasetError(
                f"{idx_path}: truncated index: header declares {sequence_count} sequences and "
                f"{document_entries} document-index entries, which need {arrays_end} bytes, "
                f"but the file has {idx_size}"
            )
        trailing = idx_size - arrays_end
        if trailing not in (0, sequence_count):
            raise IndexedDatasetError(
                f"{idx_path}: {trailing} bytes after the document index; expected none, or "
                f"{sequence_count} (one sequence mode per sequence)"
            )

        self.dtype = np.dtype(DTYPE_BY_CODE[code]).newbyteorder("<")
        lengths_at = _HEADER.size
        pointers_at = lengths_at + 4 * sequence_count
        documents_at = pointers_at + 8 * sequence_count
        # Offset 34 leaves these arrays unaligned; frombuffer views handle that without copying.
        self.sequence_lengths = np.frombuffer(idx_buffer, "<i4", sequence_count, lengths_at)
        self.sequence_pointers = np.frombuffer(idx_buffer, "<i8", sequence_count, pointers_at)
        self.document_indices = np.frombuffer(idx_buffer, "<i8", document_entries, documents_at)
        self.sequence_modes = (
            np.frombuffer(idx_buffer, "<i1", sequence_count, arrays_end) if trailing else None
        )
        self._check_document_indices(idx_path, sequence_count)
        self._check_data_size(idx_path, bin_path)

    def _check_document_indices(self, idx_path: str, sequence_count: int) -> None:
        documents = self.document_indices
        if documents.size == 0:
            raise IndexedDatasetError(f"{idx_path}: document index is empty; it must start with 0")
        if documents[0] != 0:
            raise IndexedDatasetError(f"{idx_path}: document index starts at {documents[0]}, expected 0")
        if documents[-1] != sequence_count:
            raise IndexedDatasetError(
                f"{idx_path}: document index ends at {documents[-1]}, "
                f"expected the sequence count {sequence_count}"
            )
        decreasing = documents[1:] < documents[:-1]
        if decreasing.any():
            at = int(np.argmax(decreasing))
            raise IndexedDatasetError(
                f"{idx_path}: document index decreases at entry {at + 1} "
                f"({documents[at]} -> {documents[at + 1]})"
            )

    def _check_data_size(self, idx_path: str, bin_path: str) -> None:
        # Pointers are a running sum, so the last sequence ends furthest into the .bin; checking it
        # alone keeps opening O(1) in S. Reads still bounds-check each sequence they touch.
        if self.sequence_lengths.size == 0:
            last_start = last_length = last_end = 0
        else:
            last_start = int(self.sequence_pointers[-1])
            last_length = int(self.sequence_lengths[-1])
            last_end = last_start + last_length * self.dtype.itemsize
        bin_size = len(self._bin_buffer)
        if last_start < 0 or last_length < 0 or last_end > bin_size:
            raise IndexedDatasetError(
                f"{bin_path}: data file has {bin_size} bytes, but {idx_path} places the "
                f"last sequence at bytes [{last_start}, {last_end})"
            )
        if last_end < bin_size and not self.allow_extra_bin_bytes:
            # Megatron's writer makes the .bin exactly this long: a longer one is usually another dataset's
            raise IndexedDatasetError(
                f"{bin_path} has {bin_size:,} bytes, but {idx_path} indexes exactly {last_end:,} bytes "
                f"({self.sequence_lengths.size:,} sequences): the two files do not belong together (an .idx "
                f"copied next to another dataset's .bin?). If this .bin really carries "
                f"{bin_size - last_end:,} extra trailing bytes, --data-allow-extra-bin-bytes accepts it"
            )

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))

    def __len__(self) -> int:
        self._require_open()
        return self.sequence_lengths.size

    @property
    def num_tokens(self) -> int:
        self._require_open()
        if self._num_tokens is None:
            self._num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        return self._num_tokens

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `idx` (to its end when length is None)."""
        self._require_open()
        sequence = self._sequence_number(idx)
        sequence_length = int(self.sequence_lengths[sequence])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) are outside sequence {idx} "
                f"(length {sequence_length}) of {self.path_prefix}"
            )
        start = int(self.sequence_pointers[sequence]) + offset * self.dtype.itemsize
        end = start + length * self.dtype.itemsize
        if start < 0 or end > len(self._bin_buffer):
            raise IndexedDatasetError(
                f"{data_file_path(self.path_prefix)}: sequence {sequence} needs bytes [{start}, {end}) "
                f"but the data file has {len(self._bin_buffer)}"
            )
        return np.frombuffer(self._bin_buffer, self.dtype, length, start)

    def _sequence_number(self, idx: int) -> int:
        try:
            number = operator.index(idx)
        except TypeError:
            raise TypeError(f"sequence index must be an integer, got {type(idx).__name__}") from None
        count = self.sequence_lengths.size
        if number < 0:
            number += count
        if not 0 <= number < count:
            raise IndexError(f"sequence {idx} is out of range for {self.path_prefix} ({count} sequences)")
        return number

    def _require_open(self) -> None:
        if self._bin_buffer is None:
            raise IndexedDatasetError(f"{self.path_prefix}: dataset is closed")

    def close(self) -> None:
        """Drop the memory maps. Views handed out earlier keep their map alive until freed."""
        self.sequence_lengths = self.sequence_pointers = self.document_indices = None
        self.sequence_modes = None
        self._bin_buffer = None
        for mapping in (self._idx_map, self._bin_map):
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    pass  # a caller still holds a view; the map is released when that view is freed
        self._idx_map = self._bin_map = None

    def __enter__(self) -> IndexedDataset:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_bin_map"):
            self.close()

    # Pickled by prefix (e.g. into DataLoader workers); each process maps the files itself.
    def __getstate__(self) -> str:
        return self.path_prefix

    def __setstate__(self, path_prefix: str) -> None:
        self.__init__(path_prefix)

    def __repr__(self) -> str:
        if self._bin_buffer is None:
            return f"IndexedDataset({self.path_prefix!r}, closed)"
        return (
            f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, "
            f"documents={self.document_indices.size - 1}, dtype={self.dtype.name})"
        )


class IndexedDatasetBuilder:
    """Writes a `.bin`/`.idx` pair. Tokens go to a temporary file next to `bin_path`; `finalize`
    writes the index and renames both into place, so a crash never leaves a valid-looking pair.
    Use as a context manager to delete the temporary file when building fails."""

    def __init__(self, bin_path: str, dtype: type = np.int32) -> None:
        try:
            self._dtype_code = dtype_code(dtype)
        except ValueError as error:
            raise IndexedDatasetError(f"{bin_path}: {error}") from None
        self.dtype = np.dtype(DTYPE_BY_CODE[self._dtype_code]).newbyteorder("<")
        self.bin_path = bin_path
        self._temporary_bin_path = _temporary_path(bin_path)
        try:
            self._bin_file = open(self._temporary_bin_path, "wb", buffering=_WRITE_BUFFER_BYTES)
        except OSError as error:
            raise IndexedDatasetError(f"{bin_path}: cannot open for writing: {error.strerror}") from None
        # int64 arrays: compact and appendable; exposed to numpy without copies at finalize.
        self._sequence_lengths = array.array("q")
        self._document_indices = array.array("q", [0])

    def add_item(self, tokens: Any) -> None:
        """Append one sequence to the current document."""
        values = self._token_array(tokens)
        self._write(values)
        self._sequence_lengths.append(values.size)

    def end_document(self) -> None:
        """Close the current document (an empty one too: it adds a document-index entry)."""
        self._require_open()
        self._document_indices.append(len(self._sequence_lengths))

    def add_document(self, tokens: Any, lengths: list[int]) -> None:
        """Append one document whose tokens are split into sequences of `lengths`; ends the document."""
        values = self._token_array(tokens)
        sequence_lengths = np.asarray(lengths, dtype=np.int64)
        if sequence_lengths.ndim != 1:
            raise IndexedDatasetError(f"{self.bin_path}: lengths must be a flat list of integers")
        if sequence_lengths.size and (sequence_lengths.min() < 0 or sequence_lengths.max() > _INT32_MAX):
            raise IndexedDatasetError(
                f"{self.bin_path}: sequence lengths must lie in [0, {_INT32_MAX}], got {lengths}"
            )
        if int(sequence_lengths.sum()) != values.size:
            raise IndexedDatasetError(
                f"{self.bin_path}: document lengths sum to {int(sequence_lengths.sum())} "
                f"but the document has {values.size} tokens"
            )
        self._write(values)
        self._sequence_lengths.frombytes(sequence_lengths.tobytes())
        self._document_indices.append(len(self._sequence_lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append every sequence and document of the dataset at `path_prefix` (same dtype)."""
        self._require_open()
        self._require_no_open_document("add_index()")
        with IndexedDataset(path_prefix) as source:
            idx_path = index_file_path(path_prefix)
            if source.dtype != self.dtype:
                raise IndexedDatasetError(
                    f"{idx_path}: token dtype {source.dtype.name} does not match the dtype "
                    f"{self.dtype.name} of {self.bin_path}"
                )
            if source.sequence_modes is not None:
                raise IndexedDatasetError(
                    f"{idx_path}: has sequence modes (multimodal), which this builder does not write"
                )
            lengths = source.sequence_lengths.astype(np.int64)
            contiguous_pointers = np.zeros_like(lengths)
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=contiguous_pointers[1:])
            # The merged .bin is a plain byte copy, which is only right if the source is back to back.
            if not np.array_equal(contiguous_pointers, source.sequence_pointers):
                raise IndexedDatasetError(
                    f"{idx_path}: sequences are not stored back to back in the data file; cannot merge"
                )
            first_sequence = len(self._sequence_lengths)
            self._sequence_lengths.frombytes(lengths.tobytes())
            self._document_indices.frombytes((source.document_indices[1:] + first_sequence).tobytes())
            token_bytes = int(lengths.sum()) * self.dtype.itemsize
            with memoryview(source._bin_buffer) as data:
                for start in range(0, token_bytes, _COPY_CHUNK_BYTES):
                    self._bin_file.write(data[start : min(start + _COPY_CHUNK_BYTES, token_bytes)])

    def finalize(self, idx_path: str) -> None:
        """Close the `.bin`, write the `.idx`, and move both to their final names."""
        self._require_open()
        self._require_no_open_document("finalize()")
        self._bin_file.close()
        self._bin_file = None
        lengths = np.frombuffer(self._sequence_lengths, dtype=np.int64)
        document_indices = np.frombuffer(self._document_indices, dtype=np.int64)
        pointers = np.zeros_like(lengths)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        temporary_idx_path = _temporary_path(idx_path)
        try:
            with open(temporary_idx_path, "wb") as stream:
                stream.write(
                    _HEADER.pack(_MAGIC, _VERSION, self._dtype_code, lengths.size, document_indices.size)
                )
                stream.write(lengths.astype("<i4").tobytes())
                stream.write(pointers.astype("<i8", copy=False).tobytes())
                stream.write(document_indices.astype("<i8", copy=False).tobytes())
            # .bin first: a present .idx then always has its complete .bin beside it.
            os.replace(self._temporary_bin_path, self.bin_path)
            os.replace(temporary_idx_path, idx_path)
        except OSError as error:
            for path in (temporary_idx_path, self._temporary_bin_path):
                if os.path.exists(path):
                    os.remove(path)
            raise IndexedDatasetError(f"{idx_path}: cannot write index: {error.strerror}") from None

    def _token_array(self, tokens: Any) -> np.ndarray:
        self._require_open()
        if hasattr(tokens, "detach"):  # torch.Tensor, possibly on an accelerator
            tokens = tokens.detach().cpu().numpy()
        values = np.asarray(tokens)
        if values.ndim != 1:
            raise IndexedDatasetError(
                f"{self.bin_path}: expected a 1-D sequence of token ids, got shape {values.shape}"
            )
        if values.size == 0:
            return np.empty(0, self.dtype)
        if values.size > _INT32_MAX:
            raise IndexedDatasetError(
                f"{self.bin_path}: a sequence of {values.size} tokens is longer than int32 lengths allow"
            )
        accepted_kinds = "biu" if self.dtype.kind in "iu" else "biuf"
        if values.dtype.kind not in accepted_kinds:
            raise IndexedDatasetError(
                f"{self.bin_path}: token ids of dtype {values.dtype} cannot be stored as {self.dtype.name}"
            )
        if self.dtype.kind in "iu" and not np.can_cast(values.dtype, self.dtype):
            limits = np.iinfo(self.dtype)
            lowest, highest = int(values.min()), int(values.max())
            if lowest < limits.min or highest > limits.max:
                bad = lowest if lowest < limits.min else highest
                raise IndexedDatasetError(
                    f"{self.bin_path}: token id {bad} does not fit {self.dtype.name} "
                    f"[{limits.min}, {limits.max}]"
                )
        return np.ascontiguousarray(values, dtype=self.dtype)

    def _write(self, values: np.ndarray) -> None:
        self._bin_file.write(values.data)

    def _require_open(self) -> None:
        if self._bin_file is None:
            raise IndexedDatasetError(f"{self.bin_path}: builder is already finalized or discarded")

    def _require_no_open_document(self, action: str) -> None:
        open_sequences = len(self._sequence_lengths) - self._document_indices[-1]
        if open_sequences:
            raise IndexedDatasetError(
                f"{self.bin_path}: {open_sequences} sequences added since the last end_document(); "
                f"call end_document() before {action}"
            )

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bin_file is not None:  # not finalized: discard the partial data
            self._bin_file.close()
            self._bin_file = None
            os.remove(self._temporary_bin_path)
