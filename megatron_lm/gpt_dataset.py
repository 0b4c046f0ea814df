"""GPT samples in Megatron-LM's order: document, sample and shuffle indices, cached on disk.

For the same data, split, seed, sequence length and sample count, sample k here holds the same tokens
as sample k of Megatron-core's GPTDataset (see docs/megatron-data-format.md for the algorithm).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from megatron_lm import helpers
from kotomamba.errors import KotomambaError

logger = logging.getLogger(__name__)

# Bump when the arrays' meaning or layout changes, so that old caches are not trusted.
INDEX_FORMAT_VERSION = 1

# Megatron-LM separates the final epoch when it would contribute less than this share of an epoch.
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80

# Label for the last position when samples carry no extra token (PyTorch's cross-entropy ignore index).
IGNORE_LABEL = -100


class DatasetBuildError(KotomambaError, ValueError):
    """A dataset cannot be built from the given data and settings."""


@dataclass(frozen=True)
class GPTDatasetConfig:
    seq_length: int
    seed: int
    add_extra_token: bool = True
    # Where index arrays are cached; None builds them in memory on every rank.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise DatasetBuildError(f"seq_length must be >= 1, got {self.seq_length}")


@dataclass(frozen=True)
class EpochPlan:
    """Sizes that follow from the split's token count alone, known before any index is built."""

    tokens_per_epoch: int
    num_epochs: int
    num_samples: int  # samples the sample index holds (>= the number requested)
    separate_final_epoch: bool
    samples_before_final_epoch: int  # first shuffle range when the final epoch is separate


def plan_epochs(tokens_per_epoch: int, num_samples: int | None, seq_length: int, add_extra_token: bool) -> EpochPlan:
    """Epoch count and final-epoch separation exactly as Megatron-LM computes them."""
    extra = int(add_extra_token)
    if num_samples is None:
        num_epochs = 1
    else:
        # smallest E >= 1 with E * tokens_per_epoch >= num_samples * seq_length + extra
        num_epochs = max(1, -(-(num_samples * seq_length + extra) // tokens_per_epoch))
    total_samples = max(0, num_epochs * tokens_per_epoch - extra) // seq_length
    separate = False
    samples_before_final = total_samples
    if num_epochs > 1:
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        samples_from_final = num_samples - samples_before_final
        samples_per_epoch = (tokens_per_epoch - extra) // seq_length
        separate = samples_from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
    if not separate:
        samples_before_final = total_samples
    return EpochPlan(tokens_per_epoch, num_epochs, total_samples, separate, samples_before_final)


def build_document_index(
    document_ids: np.ndarray, plan: EpochPlan, random_state: np.random.RandomState
) -> np.ndarray:
    """The split's sequence ids repeated once per epoch and shuffled (int32)."""
    ids = document_ids.astype(np.int32)
    if not plan.separate_final_epoch:
        document_index = np.tile(ids, plan.num_epochs)
        random_state.shuffle(document_index)
        return document_index
    leading_epochs = np.tile(ids, plan.num_epochs - 1)
    random_state.shuffle(leading_epochs)
    final_epoch = ids.copy()
    random_state.shuffle(final_epoch)
    return np.concatenate((leading_epochs, final_epoch))


def build_shuffle_index(plan: EpochPlan, random_state: np.random.RandomState) -> np.ndarray:
    """A permutation of the sample ids; with a separate final epoch, its samples are shuffled apart."""
    dtype = np.uint32 if plan.num_samples < np.iinfo(np.uint32).max - 1 else np.int64
    leading = np.arange(plan.samples_before_final_epoch, dtype=dtype)
    random_state.shuffle(leading)
    if plan.samples_before_final_epoch == plan.num_samples:
        return leading
    final = np.arange(plan.samples_before_final_epoch, plan.num_samples, dtype=dtype)
    random_state.shuffle(final)
    return np.concatenate((leading, final))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    document_ids: np.ndarray,
    plan: EpochPlan,
    seq_length: int,
    seed: int,
    add_extra_token: bool,
) -> dict[str, np.ndarray]:
    """The three index arrays. One RandomState serves the document shuffle(s), then the sample shuffle(s)."""
    random_state = np.random.RandomState(seed)
    document_index = build_document_index(document_ids, plan, random_state)
    sample_index = helpers.build_sample_idx(
        sequence_lengths, document_index, seq_length, plan.num_epochs, plan.tokens_per_epoch, add_extra_token
    )
    shuffle_index = build_shuffle_index(plan, random_state)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# ---- index cache shared with BlendedDataset ---------------------------------------------------------


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtypes: tuple[np.dtype, ...]


def _distributed_rank() -> tuple[bool, int]:
    # A process group exists only if torch.distributed was imported; don't pay torch's import otherwise.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return True, dist.get_rank()
    return False, 0


def _barrier() -> None:
    sys.modules["torch.distributed"].barrier()


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _cache_paths(cache_dir: Path, stem: str, description_text: str, names: Sequence[str]) -> tuple[Path, dict]:
    digest = hashlib.sha256(description_text.encode()).hexdigest()[:32]
    base = f"{digest}-{stem}"
    return cache_dir / f"{base}-description.json", {name: cache_dir / f"{base}-{name}.npy" for name in names}


def _load_cached(description_path: Path, array_paths: dict, description_text: str, specs: dict) -> dict | None:
    """The cached arrays, or None unless the description matches and every array has the expected shape."""
    try:
        if description_path.read_text() != description_text:
            return None
        arrays = {}
        for name, path in array_paths.items():
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            spec = specs[name]
            if array.shape != spec.shape or array.dtype not in spec.dtypes:
                logger.warning(
                    "ignoring cached %s: shape %s dtype %s, expected %s", path, array.shape, array.dtype, spec
                )
                return None
            arrays[name] = array
        return arrays
    except (OSError, ValueError, EOFError):
        return None


def load_or_build_cached_indices(
    cache_dir: str | None,
    stem: str,
    description: dict,
    specs: dict[str, ArraySpec],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Index arrays from `cache_dir`, keyed by `description`; built (on global rank 0 only) when absent.

    Arrays are written first and the description last, each through a temp file and a rename, and a
    cache is used only if the description matches and all shapes are right: a crash mid-write is
    never mistaken for a valid cache.
    """
    if cache_dir is None:
        return build()
    description_text = json.dumps(description, indent=2, sort_keys=True)
    description_path, array_paths = _cache_paths(Path(cache_dir), stem, description_text, list(specs))
    distributed, rank = _distributed_rank()
    arrays = None
    if rank == 0:
        arrays = _load_cached(description_path, array_paths, description_text, specs)
        if arrays is None:
            started = time.perf_counter()
            arrays = build()
            try:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                for name, path in array_paths.items():
                    _write_atomically(path, lambda handle, a=arrays[name]: np.save(handle, a, allow_pickle=False))
                _write_atomically(description_path, lambda handle: handle.write(description_text.encode()))
            except OSError as error:
                raise DatasetBuildError(f"cannot write the index cache in {cache_dir}: {error}") from error
            logger.info("built %s indices in %.2f s, cached under %s", stem, time.perf_counter() - started, cache_dir)
        else:
            logger.info("loaded cached %s indices from %s", stem, cache_dir)
    if distributed:
        _barrier()
        if rank != 0:
            arrays = _load_cached(description_path, array_paths, description_text, specs)
            if arrays is None:
                # e.g. cache_dir is node-local: rank 0's files are not visible here.
                logger.warning("rank %d cannot see the %s index cache in %s; building in memory", rank, stem, cache_dir)
                arrays = build()
    return arrays


def _file_fingerprint(path: str) -> dict:
    try:
        stat = os.stat(path)
    except OSError as error:
        raise DatasetBuildError(f"cannot stat {path}: {error}") from error
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _describe_document_ids(document_ids: Sequence[int] | np.ndarray) -> dict:
    if isinstance(document_ids, range) and document_ids.step == 1:
        return {"start": document_ids.start, "stop": document_ids.stop}
    ids = np.ascontiguousarray(document_ids, dtype=np.int64)
    return {"count": int(ids.size), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def _id_array(document_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(document_ids, range):  # np.asarray would walk a range element by element
        return np.arange(document_ids.start, document_ids.stop, document_ids.step, dtype=np.int64)
    return np.asarray(document_ids, dtype=np.int64)


# ---- the dataset ------------------------------------------------------------------------------------


class GPTDataset:
    """Samples of seq_length (+1) tokens drawn from `document_ids` of an IndexedDataset, Megatron order.

    `dataset[k]` is {"tokens": int64[L], "labels": int64[L]}; labels are tokens shifted by one. Without
    the extra token, the last label is IGNORE_LABEL.
    """

    def __init__(
        self,
        indexed_dataset: Any,
        split_name: str,
        document_ids: Sequence[int] | np.ndarray,
        num_samples: int | None,
        config: GPTDatasetConfig,
    ) -> None:
        self.indexed_dataset = indexed_dataset
        self.split_name = split_name
        self.config = config
        self.num_samples_requested = num_samples
        self._document_ids_key = _describe_document_ids(document_ids)
        ids = _id_array(document_ids)
        num_sequences = len(indexed_dataset)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= num_sequences)):
            raise DatasetBuildError(
                f"split {split_name!r} of {indexed_dataset.path_prefix}: sequence ids must lie in "
                f"[0, {num_sequences})"
            )
        if num_samples is not None and num_samples < 0:
            raise DatasetBuildError(f"split {split_name!r}: num_samples must be >= 0, got {num_samples}")
        sequence_lengths = indexed_dataset.sequence_lengths
        tokens_per_epoch = int(sequence_lengths[ids].sum(dtype=np.int64))
        sample_tokens = config.seq_length + int(config.add_extra_token)
        if tokens_per_epoch < sample_tokens:
            raise DatasetBuildError(
                f"split {split_name!r} of {indexed_dataset.path_prefix} holds {ids.size} of {num_sequences} "
                f"sequences ({tokens_per_epoch} tokens), fewer than one sample of {sample_tokens} tokens, but "
                f"{'one epoch' if num_samples is None else f'{num_samples} samples'} was requested: use more "
                f"data, a larger share of it for this split (--split), or a shorter sequence length"
            )
        self.plan = plan_epochs(tokens_per_epoch, num_samples, config.seq_length, config.add_extra_token)

        sample_index_dtypes = (np.dtype(np.int32), np.dtype(np.int64))
        specs = {
            "document_index": ArraySpec((self.plan.num_epochs * ids.size,), (np.dtype(np.int32),)),
            "sample_index": ArraySpec((self.plan.num_samples + 1, 2), sample_index_dtypes),
            "shuffle_index": ArraySpec((self.plan.num_samples,), (np.dtype(np.uint32), np.dtype(np.int64))),
        }
        arrays = load_or_build_cached_indices(
            config.cache_dir,
            f"GPTDataset-{split_name}",
            self.cache_description() if config.cache_dir is not None else {},
            specs,
            lambda: build_gpt_indices(
                sequence_lengths, ids, self.plan, config.seq_length, config.seed, config.add_extra_token
            ),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def cache_description(self) -> dict:
        """Everything that changes the index arrays; equal descriptions mean interchangeable arrays."""
        prefix = self.indexed_dataset.path_prefix
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "class": "GPTDataset",
            "idx_file": _file_fingerprint(f"{prefix}.idx"),
            "bin_file": _file_fingerprint(f"{prefix}.bin"),
            "split": self.split_name,
            "document_ids": self._document_ids_key,
            "seed": self.config.seed,
            "seq_length": self.config.seq_length,
            "num_samples": self.num_samples_requested,
            "add_extra_token": self.config.add_extra_token,
        }

    def __len__(self) -> int:
        return self.plan.num_samples

    @property
    def samples_per_epoch(self) -> int:
        """Samples one pass over the split's documents makes (its sample index repeats after that)."""
        return max(1, (self.plan.tokens_per_epoch - int(self.config.add_extra_token)) // self.config.seq_length)

    def sample_tokens(self, k: int) -> np.ndarray:
        """The seq_length (+1) token ids of sample k, as int64."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"sample {k} out of range for the {self.split_name} split ({len(self)} samples)")
        sample = int(self.shuffle_index[k])
        first_position, first_offset = (int(v) for v in self.sample_index[sample])
        last_position, last_offset = (int(v) for v in self.sample_index[sample + 1])
        extra = int(self.config.add_extra_token)
        parts = []
        for position in range(first_position, last_position + 1):
            offset = first_offset if position == first_position else 0
            length = last_offset + extra - offset if position == last_position else None
            if length == 0:
                continue
            parts.append(self.indexed_dataset.get(int(self.document_index[position]), offset=offset, length=length))
        tokens = np.concatenate(parts).astype(np.int64, copy=False)
        if tokens.size != self.config.seq_length + extra:
            raise DatasetBuildError(
                f"sample {k} of the {self.split_name} split of {self.indexed_dataset.path_prefix} has "
                f"{tokens.size} tokens instead of {self.config.seq_length + extra}: the index cache does not "
                f"match the data; delete it from {self.config.cache_dir}"
            )
        return tokens

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        sample = self.sample_tokens(k)
        if self.config.add_extra_token:
            return {"tokens": sample[:-1], "labels": sample[1:]}
        labels = np.empty_like(sample)
        labels[:-1] = sample[1:]
        labels[-1] = IGNORE_LABEL
        return {"tokens": sample, "labels": labels}
