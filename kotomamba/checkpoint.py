"""Training checkpoints: sharded save, exact resume (also on another number of processes), crash
safety; the readers that loading a model outside training (kotomamba.model_loading) uses too.

One object, :class:`CheckpointManager`, owns every piece of state a resume needs: the FSDP model,
the optimizer, the loss scaler, the progress counters (:class:`kotomamba.state.TrainState`), each
rank's random number generators and the position in the data. The training loop calls it at three
places: ``load`` (before the training data loader is built, so that it starts at the restored
``consumed_samples``), ``save`` (through kotomamba.run_control at --save-interval, SIGTERM/SIGUSR1 and
``--exit-*``) and ``finish`` (the final save).

On-disk layout of a ``--save`` directory::

    SAVE/
      latest                 the name of the newest complete checkpoint ("iter_0000500"), replaced atomically
      iter_0000500/          one complete checkpoint
        checkpoint.json      progress counters, loss scaler, checkpoint type, world size, versions,
                             tokenizer identity, data fingerprint (readable JSON)
        checksums.json       size and CRC32 of every other file, written last; checked before a load
        config.yaml          the run's resolved configuration (kotomamba.config.config_dict)
        model_config.json    the mamba-ssm config.json of the model
        tokenizer/           a copy of the tokenizer files (SentencePiece .model, or Hugging Face files)
        rng/rank_00000.pt    each rank's RNG states: python, numpy, torch CPU, CUDA
        state/               SHARDED_STATE_DICT / LOCAL_STATE_DICT: model + optimizer written by every
                             rank in parallel with torch.distributed.checkpoint (.metadata, __R_0.distcp)
        state.pt             FULL_STATE_DICT instead: one file {"model", "optimizer"} written by rank 0
      .tmp-iter_0000600/     a save in progress, or one interrupted by a crash: never read, removed at start
      (anything else, e.g. a metrics logger's run id, is left alone)

Crash safety: a checkpoint is written into ``.tmp-iter_N``, published by one atomic rename to
``iter_N`` once every rank has finished writing, and only then named in ``latest`` (an atomic replace
of a small file). A process killed at any moment leaves the previous checkpoint and ``latest``
intact. ``--keep-last-k`` deletes only complete, older checkpoints, never the one ``latest`` names.
Damage after publishing (a truncated or overwritten shard, a flipped bit) is caught before loading:
every file's size and CRC32 are recorded in ``checksums.json``, computed by all ranks in parallel (each
a share of the files) once every rank has written, and verified the same way when a run resumes; the
error names the file. Cost: about 1 GB/s per rank (docs/benchmarks.md, checkpoint_io).

Resume rules (also in README "Checkpoints and export"):

* the model architecture must match the checkpoint's ``model_config.json``;
* the number of processes, the sharding strategy, the micro batch size and the precision may change
  (the sharded format is resharded on load; RNG states are restored only on the same world size);
* the global batch size may change: training continues at sample ``consumed_samples`` of the same
  data order (Megatron's behaviour), the learning-rate schedule keeps counting iterations;
* a different sequence length, tokenizer, or training-data order (other ``--data-path``/``--split``/
  ``--seed``, other data files, or a sample count that changes Megatron's epoch plan) is refused,
  unless ``--override-data-on-resume`` is given: then training continues at ``consumed_samples`` of
  the new data order. The data order is checked directly: the checkpoint stores a hash of the token
  ids of the training samples around ``consumed_samples``, and the resumed run recomputes it.
* optimizer hyperparameters (betas, eps, weight decay) and the learning-rate schedule come from the
  command line of the resumed run; the checkpoint provides the optimizer moments and the iteration.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import random
import shutil
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from kotomamba.config import RunConfig, config_dict
from kotomamba.checkpoint_layout import (CHECKPOINT_BYTES, ITERATION_DIR, LATEST, METADATA, iteration_dir_name,
                                        saves_ahead)
from kotomamba.version import __version__
from megatron_lm.tokenizer import same_tokenizer, tokenizer_files
from kotomamba.errors import KotomambaError

if TYPE_CHECKING:
    from kotomamba.distributed import DistributedContext
    from kotomamba.state import TrainState

logger = logging.getLogger("kotomamba")

FORMAT_VERSION = 1
CHECKSUMS = "checksums.json"
CONFIG_YAML = "config.yaml"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
RNG_DIR = "rng"
SHARDED_STATE = "state"
FULL_STATE = "state.pt"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
SHARDED_TYPES = ("SHARDED_STATE_DICT", "LOCAL_STATE_DICT")
# The flags that choose the training samples' order; a resume compares them with the checkpoint's.
DATA_SOURCES = ("data_path", "train_data_path", "split", "seed", "stages")
# Training samples hashed on each side of consumed_samples to detect a changed data order on resume.
FINGERPRINT_SAMPLES = 8
# checkpoint.json keys a resume reads; a file without them is damaged (e.g. truncated, then "repaired").
_REQUIRED_METADATA = {"format_version", "iteration", "checkpoint_type", "world_size", "train_state", "data",
                      "tokenizer"}


class TrainingCheckpointError(KotomambaError, RuntimeError):
    """A training checkpoint cannot be saved, found or resumed; the message names the path or flag."""


# ----------------------------------------------------------------------------------------------
# Finding checkpoints


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory that ``path`` designates, or None when it holds none.

    ``path`` is a run's ``--save`` directory (the checkpoint ``latest`` names; without ``latest``, the
    newest complete ``iter_*``) or one ``iter_*`` checkpoint directory. A missing or empty directory
    holds none; a ``latest`` naming a checkpoint that is not there is an error unless a complete one
    remains (then the newest is used, with a warning).
    """
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise TrainingCheckpointError(f"{path} is not a directory (expected a --save directory or an iter_* checkpoint)")
    if (path / METADATA).is_file():
        return path
    if ITERATION_DIR.fullmatch(path.name):
        raise TrainingCheckpointError(f"{path} is not a complete checkpoint (it has no {METADATA})")
    complete = _complete_checkpoints(path)
    latest = path / LATEST
    if latest.is_file():
        try:
            name = latest.read_text().strip()
        except OSError as error:
            raise TrainingCheckpointError(f"cannot read {latest}: {error.strerror or error}") from None
        if name.isdigit():  # Megatron's tracker file holds the iteration number
            name = iteration_dir_name(int(name))
        target = path / name
        if ITERATION_DIR.fullmatch(name) and (target / METADATA).is_file():
            return target
        if not complete:
            raise TrainingCheckpointError(f"{latest} names {name!r}, but {target} is not a complete checkpoint")
        logger.warning("%s names %r, which is not a complete checkpoint; using the newest complete one, %s",
                       latest, name, complete[-1].name)
    elif complete:
        logger.warning("%s has no %s file (removed, or the run was copied without it); using the newest complete "
                       "checkpoint, %s", path, LATEST, complete[-1].name)
    return complete[-1] if complete else None


def not_a_training_checkpoint(path: str | Path) -> str | None:
    """Why a directory that holds no kotomamba checkpoint must not be taken as a fresh start by --load:
    it holds a model (resume means --base-model) or another tool's iter_* checkpoints. None otherwise."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        return (f"{path} holds a model (config.json), not a training checkpoint: to start from its weights use "
                f"--base-model {path}")
    foreign = sorted(child.name for child in path.iterdir()
                     if child.is_dir() and ITERATION_DIR.fullmatch(child.name) and not (child / METADATA).is_file())
    if foreign:
        return (f"{path / foreign[-1]} is not a kotomamba checkpoint (no {METADATA}; Megatron-LM and the old "
                f"kotomamba write others): it cannot be resumed; export its weights to a mamba-ssm or Hugging "
                f"Face directory and use --base-model")
    return None


def _complete_checkpoints(save_dir: Path) -> list[Path]:
    """``iter_*`` directories holding checkpoint.json, oldest first. Only complete checkpoints carry
    these names: they are published by renaming a finished temporary directory."""
    found = []
    try:
        children = list(save_dir.iterdir())
    except OSError:
        return []
    for child in children:
        match = ITERATION_DIR.fullmatch(child.name)
        if match and (child / METADATA).is_file():
            found.append((int(match.group(1)), child))
    return [child for _, child in sorted(found)]


def read_metadata(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / METADATA
    try:
        metadata = json.loads(path.read_text())
    except OSError as error:
        raise TrainingCheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise TrainingCheckpointError(f"{path} is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise TrainingCheckpointError(f"{path} is not valid JSON (it holds binary data): the file is damaged") from None
    if not isinstance(metadata, dict):
        raise TrainingCheckpointError(f"{path} is not a kotomamba checkpoint description (not a JSON object): "
                                      f"the file is damaged")
    version = metadata.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise TrainingCheckpointError(
            f"{path}: checkpoint format {version!r} was written by a newer kotomamba "
            f"({metadata.get('kotomamba_version')}); this is {__version__} (format {FORMAT_VERSION})"
        )
    missing = sorted(_REQUIRED_METADATA - set(metadata))
    if missing or not isinstance(version, int):
        raise TrainingCheckpointError(f"{path} is not a kotomamba checkpoint description (missing or invalid "
                                      f"{missing or ['format_version']}): the file is damaged")
    return metadata


# ----------------------------------------------------------------------------------------------
# Small file-system helpers (crash safety)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories; the rename is still atomic
    finally:
        os.close(fd)


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _replace_file_atomically(path: Path, text: str) -> None:
    """Readers see the old or the new content, never a partial file."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_bytes_durably(temporary, text.encode())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# A checkpoint's room on disk beyond its weights and moments: torch.distributed.checkpoint frames each
# tensor (the weight, its two moments and AdamW's step count: about 1.3 KiB each, measured) and lists it in
# .metadata; each rank writes its RNG states (about 16 KiB); a margin covers the rest.
BYTES_PER_SAVED_TENSOR = 2 << 10
RNG_BYTES_PER_RANK = 16 << 10
SPACE_MARGIN = 1.05
SPACE_EXTRA_BYTES = 64 << 10


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _size(count: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def _discard_dir(path: Path) -> None:
    """Remove a directory so that a crash half-way never leaves a partial ``iter_*`` behind: rename
    it out of the way first, then delete."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _publish(temporary: Path, final: Path, keep_last_k: int | None) -> None:
    """Make a fully written checkpoint visible: rename it into place, then point ``latest`` at it,
    then prune. Rank 0 only, after every rank finished writing."""
    save_dir = final.parent
    for directory in (temporary, *[p for p in temporary.iterdir() if p.is_dir()]):
        _fsync_dir(directory)
    if final.exists():  # left by a run killed after publishing but before updating latest
        _discard_dir(final)
    os.rename(temporary, final)
    _fsync_dir(save_dir)
    _replace_file_atomically(save_dir / LATEST, final.name + "\n")
    if keep_last_k:
        _prune(save_dir, keep_last_k, keep=final)


def _prune(save_dir: Path, keep_last_k: int, keep: Path) -> None:
    """Delete complete checkpoints older than the newest ``keep_last_k`` (never ``keep``)."""
    complete = _complete_checkpoints(save_dir)
    for old in complete[:-keep_last_k]:
        if old != keep:
            _discard_dir(old)
            logger.info("deleted checkpoint %s (--keep-last-k %d)", old, keep_last_k)


def _describe_failure(error: BaseException) -> str:
    """One line for an exception, unwrapping torch.distributed.checkpoint's per-rank failures."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = sorted(failures.items())[0]
        return f"rank {rank}: {_describe_failure(inner)}"
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    from kotomamba.model import describe_load_failure

    return describe_load_failure(error)


def _sharded_files_problem(location: Path) -> str | None:
    """Damage that torch.distributed.checkpoint would report without naming the file: an unreadable
    .metadata, or a shard file missing or shorter than .metadata records. None when none is found."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(location)).read_metadata()
        storage = metadata.storage_data or {}
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as error:  # a damaged .metadata fails in many ways
        return f"cannot read {location / '.metadata'}: {_describe_failure(error)}"
    for name, size in sorted(needed.items()):
        path = location / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size < size:
            return f"{path} is truncated ({path.stat().st_size} bytes; {size} expected)"
    return None


# ----------------------------------------------------------------------------------------------
# Reading the saved model and optimizer state: one path for both formats


def read_state(directory: Path, checkpoint_type: str, into: dict[str, Any], model_config: Any,
               agree: Callable[[str | None], None] | None = None, no_dist: bool = False) -> dict[str, Any]:
    """The state dicts saved in checkpoint ``directory`` under ``into``'s keys ("model", and "optimizer"
    when wanted); a problem is a TrainingCheckpointError naming the file.

    Sharded formats are read by every rank into ``into``'s tensors, which give the shapes and the
    sharding (``no_dist``: one process without a process group). Every rank passes the damage it finds
    before reading, then its read failure, to ``agree`` (None: raise it), which lets every rank stop
    together: DCP's read is a collective. The full format's state.pt is read whole by one rank and
    returned as saved, a tied lm_head restored.
    """
    agree = agree or _raise_error
    if checkpoint_type in SHARDED_TYPES:
        import torch.distributed.checkpoint as dcp

        location = directory / SHARDED_STATE
        problem = _sharded_files_problem(location)
        agree(problem and f"cannot read checkpoint {location}: {problem}")

        def load() -> None:
            with warnings.catch_warnings():
                if no_dist:  # "assuming the intent is to load in a single process": it is
                    warnings.simplefilter("ignore", UserWarning)
                dcp.load(into, checkpoint_id=str(location), no_dist=no_dist)

        failure = _failure_of(load)
        agree(failure and f"cannot read checkpoint {location}: {failure}")
        return into
    location = directory / FULL_STATE
    try:
        full = torch.load(location, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # any reader failure is a damaged or missing file
        raise TrainingCheckpointError(f"cannot read checkpoint {location}: {_describe_failure(exc)}") from None
    missing = [key for key in into if not isinstance(full, dict) or not isinstance(full.get(key), dict)]
    if missing:
        raise TrainingCheckpointError(
            f"checkpoint {location} has no {' or '.join(repr(key) for key in missing)} state")
    if getattr(model_config, "tie_embeddings", False) and "lm_head.weight" not in full["model"]:
        full["model"]["lm_head.weight"] = full["model"]["backbone.embedding.weight"]  # saved once
    return full


def _raise_error(error: str | None) -> None:
    if error is not None:
        raise TrainingCheckpointError(error)


def _failure_of(action: Callable[[], Any]) -> str | None:
    """Run ``action``; a failure becomes its one-line description. torch.distributed.checkpoint reports
    failures as CheckpointException, a BaseException: everything but an interrupt or exit is caught."""
    try:
        action()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return _describe_failure(exc)
    return None


# ----------------------------------------------------------------------------------------------
# Checksums: every file of a checkpoint, shared out over the ranks


def _checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory but checksums.json, relative and sorted (the same list on every rank)."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")
                  if path.is_file() and path.name != CHECKSUMS)


def _share(items: list[str], rank: int, world_size: int) -> list[str]:
    return items[rank::world_size]


def _file_checksum(path: Path) -> dict[str, Any]:
    crc, size = 0, 0
    with open(path, "rb") as file:
        while block := file.read(16 * 2**20):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def _verify_files(directory: Path, recorded: dict[str, dict[str, Any]], names: list[str]) -> str | None:
    """The first of `names` whose size or CRC32 differs from `recorded`, described; None when all match."""
    for name in names:
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        expected = recorded[name]
        actual = _file_checksum(path)
        if actual["bytes"] != expected["bytes"]:
            return (f"{path} has changed since it was saved (damaged or edited): {actual['bytes']} bytes, "
                    f"{expected['bytes']} when saved")
        if actual["crc32"] != expected["crc32"]:
            return (f"{path} has changed since it was saved (damaged or edited): its CRC32 is {actual['crc32']}, "
                    f"{expected['crc32']} when saved")
    return None


def read_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / CHECKSUMS
    try:
        recorded = json.loads(path.read_text())
    except OSError as error:
        raise TrainingCheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TrainingCheckpointError(f"{path} is not valid JSON: the file is damaged") from None
    if not isinstance(recorded, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("crc32"), str)
            for v in recorded.values()):
        raise TrainingCheckpointError(f"{path} does not map file names to sizes and CRC32s: the file is damaged")
    return recorded


def verify_checkpoint_files(directory: Path, metadata: dict[str, Any], rank: int = 0,
                            world_size: int = 1) -> str | None:
    """Check this rank's share of a checkpoint's files against checksums.json; a description of the
    first damaged or missing file, or None. `metadata` is its checkpoint.json (read_metadata);
    checkpoints saved without checksums.json pass."""
    if "checksums" not in metadata:
        return None
    try:
        recorded = read_checksums(directory)
    except TrainingCheckpointError as error:
        return str(error)
    return _verify_files(directory, recorded, _share(sorted(recorded), rank, world_size))


# ----------------------------------------------------------------------------------------------
# RNG states


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": numpy_state[0], "key": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's GPU only: touching the others would create a CUDA context on each of them.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["key"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _rng_file(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir / RNG_DIR / f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------
# Data identity


def data_fingerprint(dataset: Any, start: int, end: int) -> str | None:
    """sha256 of the token ids of samples [start, end) of ``dataset``; None when it has fewer samples."""
    if end > len(dataset):
        return None
    digest = hashlib.sha256()
    for index in range(start, end):
        digest.update(np.ascontiguousarray(dataset[index]["tokens"], dtype=np.int64).tobytes())
    return digest.hexdigest()


def evaluation_resume_position(dataset_size: int, consumed_samples: int, samples_per_micro_step: int) -> int:
    """Where an evaluation stream that wraps at the end of its dataset continues after ``consumed_samples``."""
    period = dataset_size // samples_per_micro_step * samples_per_micro_step
    return consumed_samples % period if period else 0


# ----------------------------------------------------------------------------------------------
# The manager


@dataclasses.dataclass
class _PendingSave:
    iteration: int
    temporary: Path
    final: Path
    started: float
    future: Future | None = None  # a background write (--async-save); None once written synchronously
    error: str | None = None


class CheckpointManager:
    """Saves and restores everything a resume needs; see the module docstring for the layout and rules.

    Every public method is called by every rank at the same point of the loop: they use collectives.
    """

    def __init__(self, config: RunConfig, ctx: DistributedContext, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: Any, tokenizer: Any, model_config: Any) -> None:
        self.config = config  # saved whole with every checkpoint; read: its checkpoint section and the resume identity
        self.flags = flags = config.checkpoint
        self.ctx = ctx
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.save_dir = Path(flags.save) if flags.save else None
        self.last_saved_iteration: int | None = None
        self._published_bytes: int | None = None  # the size of the last checkpoint this run published
        self._pending: _PendingSave | None = None
        self._train_dataset: Any = None
        sharded = flags.checkpoint_type in SHARDED_TYPES
        self._async = bool(flags.async_save) and self.save_dir is not None
        # Background writes run collectives while training runs its own: they get their own gloo group.
        self._async_group = dist.new_group(backend="gloo") if self._async and sharded else None
        self._writer = ThreadPoolExecutor(1, "checkpoint-writer") if self._async and not sharded else None
        if self.save_dir is not None:
            self._agree(self._on_rank0(self._prepare_save_dir))
        self.resume_dir: Path | None = None
        self.resume_metadata: dict[str, Any] | None = None
        if flags.load:
            # Rank 0 decides which checkpoint and reads its metadata; every rank then uses the same.
            found, metadata, error = None, None, None
            if ctx.rank == 0:
                try:
                    found = find_checkpoint(flags.load)
                    metadata = read_metadata(found) if found is not None else None
                    if found is None and (reason := not_a_training_checkpoint(flags.load)):
                        raise TrainingCheckpointError(reason)
                except TrainingCheckpointError as exc:
                    error = f"--load {flags.load}: {exc}"
            self._agree(error)
            self.resume_dir, self.resume_metadata = self._broadcast((found, metadata))

    # --- collectives ------------------------------------------------------------------------------

    def _distributed(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def _broadcast(self, value: Any) -> Any:
        if not self._distributed():
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _agree(self, error: str | None, cleanup: Callable[[], None] | None = None) -> None:
        """Raise the same TrainingCheckpointError on every rank when any rank reports an error."""
        errors = [error]
        if self._distributed():
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed:
            if cleanup is not None and self.ctx.rank == 0:
                cleanup()
            rank, message = failed[0]
            where = f" (rank {rank})" if self._distributed() else ""
            raise TrainingCheckpointError(f"{message}{where}")

    def _on_rank0(self, action: Callable[[], None]) -> str | None:
        """Run ``action`` on rank 0 only; its OSError becomes the message every rank will raise."""
        if self.ctx.rank != 0:
            return None
        return _capture(action)

    # --- setup --------------------------------------------------------------------------------------

    def _prepare_save_dir(self) -> None:
        """Fail at start, not after hours of training, when --save cannot be written; remove the debris
        of saves that a crash interrupted."""
        assert self.save_dir is not None
        try:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            probe = self.save_dir / f".write-test-{os.getpid()}"
            _write_bytes_durably(probe, b"ok")
            probe.unlink()
        except OSError as error:
            raise TrainingCheckpointError(f"--save {self.save_dir}: cannot write there ({_describe_failure(error)})") from None
        for child in self.save_dir.iterdir():
            if child.is_dir() and child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                logger.warning("removing %s, left by an interrupted save", child)
                shutil.rmtree(child, ignore_errors=True)
        existing = _complete_checkpoints(self.save_dir)
        resuming_here = self.flags.load and Path(self.flags.load).resolve() in (
            self.save_dir.resolve(), *(path.resolve() for path in existing))
        if existing and not resuming_here:
            logger.warning("--save %s already holds checkpoints (newest %s) and this run does not resume from it "
                           "(--load): checkpoints of the same iterations will be replaced", self.save_dir,
                           existing[-1].name)

    # --- disk space ---------------------------------------------------------------------------------

    def checkpoint_bytes(self) -> int:
        """The room one more checkpoint needs: the size of the last one this run published, else an
        estimate (fp32 weights and AdamW moments of every parameter, their framing, the RNG states, the
        tokenizer files), plus a margin."""
        size = self._published_bytes
        if size is None:
            tokenizer = self.config.tokenizer
            files = tokenizer_files(tokenizer.tokenizer_type, tokenizer.tokenizer_model)
            copied = sum(path.stat().st_size for path in files if path.is_file())
            parameters = list(self.model.parameters())
            size = (sum(p.numel() for p in parameters) * CHECKPOINT_BYTES + 4 * len(parameters) * BYTES_PER_SAVED_TENSOR
                    + self.ctx.world_size * RNG_BYTES_PER_RANK + copied)
        return int(size * SPACE_MARGIN) + SPACE_EXTRA_BYTES

    def check_disk_space(self, state: TrainState) -> None:
        """Before training: refuse a run whose next checkpoint does not fit in --save, or whose kept
        checkpoints (--keep-last-k) do not; warn when the saves of a run that keeps them all will fill the
        disk before it ends. Every rank raises the same error."""
        if self.save_dir is None:
            return
        train_iters, save_interval = self.config.batch.train_iters, self.flags.save_interval
        saves = saves_ahead(state.iteration, train_iters, save_interval)

        def check() -> None:
            size, free = self.checkpoint_bytes(), _free_bytes(self.save_dir)
            if saves == 0:
                return
            if free < size:
                raise TrainingCheckpointError(
                    f"--save {self.save_dir}: {_size(free)} free, but one checkpoint of this model needs about "
                    f"{_size(size)}; free space there or save elsewhere")
            keep = self.flags.keep_last_k
            if keep:
                # A save writes the new checkpoint before it deletes the oldest: keep + 1 exist for a moment.
                count = min(saves, max(keep + 1 - len(_complete_checkpoints(self.save_dir)), 1))
                if free < count * size:
                    raise TrainingCheckpointError(
                        f"--save {self.save_dir}: {_size(free)} free, but --keep-last-k {keep} needs room for "
                        f"{count} more checkpoint(s) of about {_size(size)} ({_size(count * size)}); free space "
                        f"there or lower --keep-last-k")
            elif free < saves * size:
                logger.warning(
                    "--save %s: %s free holds about %d of the %d checkpoints of about %s this run still writes "
                    "(one every %d iterations, all kept): it will stop with an error when a save no longer "
                    "fits; free space there or bound them with --keep-last-k", self.save_dir, _size(free),
                    free // size, saves, _size(size), save_interval)

        self._agree(self._on_rank0(check))

    def _space_for_save(self, iteration: int) -> None:
        size, free = self.checkpoint_bytes(), _free_bytes(self.save_dir)
        if free < size:
            raise TrainingCheckpointError(
                f"--save {self.save_dir}: not enough free space for the checkpoint of iteration {iteration}: it "
                f"needs about {_size(size)}, {_size(free)} free; nothing was written and "
                f"{self._describe_latest()}. "
                f"Free space there (or keep fewer checkpoints with --keep-last-k) and resume with --load "
                f"{self.save_dir}")

    def train_samples_needed(self) -> int:
        """Training samples a resumed run reads in total: more than --train-iters × GBS when the global
        batch size shrank since the checkpoint."""
        if self.resume_metadata is None:
            return 0
        progress = self.resume_metadata["train_state"]
        batch = self.config.batch
        remaining = max(0, batch.train_iters - progress["iteration"])
        return progress["consumed_samples"] + remaining * batch.global_batch_size

    # --- load ---------------------------------------------------------------------------------------

    def load(self, state: TrainState, train_dataset: Any) -> TrainState:
        """Restore model, optimizer, loss scaler, counters and RNG states from --load, if it holds a
        checkpoint; otherwise return ``state`` unchanged. Call before building the training loader."""
        self._train_dataset = train_dataset
        if self.resume_dir is None:
            if self.flags.load:
                logger.info("--load %s holds no checkpoint: starting from scratch", self.flags.load)
            return state
        directory, metadata = self.resume_dir, self.resume_metadata
        assert metadata is not None
        started = time.perf_counter()
        error = verify_checkpoint_files(directory, metadata, self.ctx.rank, self.ctx.world_size)
        self._agree(error and f"cannot resume from {directory}: {error}")
        logger.info("checked the files of %s against %s (%.1f s)", directory, CHECKSUMS, time.perf_counter() - started)
        self._check_model_config(directory)
        self._check_data(directory, metadata, train_dataset)
        self._load_model_and_optimizer(directory, metadata)
        if metadata.get("loss_scaler"):
            self.scaler.load_state_dict(metadata["loss_scaler"])
        saved_state = metadata["train_state"]
        for field in dataclasses.fields(state):
            if field.name in saved_state:
                setattr(state, field.name, saved_state[field.name])
        if metadata["world_size"] == self.ctx.world_size:
            rng_path = _rng_file(directory, self.ctx.rank)
            try:
                _set_rng_state(torch.load(rng_path, weights_only=True))
                error = None
            except Exception as exc:  # a missing or damaged file
                error = f"cannot restore RNG states from {rng_path}: {_describe_failure(exc)}"
            self._agree(error)
        else:
            logger.info("RNG states are per rank and the checkpoint has %d; this run has %d processes, whose "
                        "generators keep their seeded state", metadata["world_size"], self.ctx.world_size)
        self.last_saved_iteration = state.iteration
        logger.info(
            "resumed from %s: iteration %d, consumed samples %d, consumed tokens %s (saved as %s by %d process(es); "
            "now %d)", directory, state.iteration, state.consumed_samples, f"{state.consumed_tokens:,}",
            metadata["checkpoint_type"], metadata["world_size"], self.ctx.world_size,
        )
        return state

    def _check_model_config(self, directory: Path) -> None:
        path = directory / MODEL_CONFIG
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TrainingCheckpointError(f"cannot read {path}: {error}") from None
        current = _config_dict(self.model_config)
        differences = [f"{key} {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
                       for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
        if differences:
            raise TrainingCheckpointError(
                f"--load {directory}: the checkpoint holds a different model than this run builds "
                f"({'; '.join(differences)}); resume with the checkpoint's model ({path})"
            )

    def _check_data(self, directory: Path, metadata: dict[str, Any], train_dataset: Any) -> None:
        """Refuse (unless --override-data-on-resume) a resume that would read other samples than the
        interrupted run would have; log the accepted changes."""
        saved, seq_length, global_batch_size = metadata["data"], self.config.data.seq_length, self.config.batch.global_batch_size
        problems = []
        if saved["seq_length"] != seq_length:
            problems.append(f"--seq-length {seq_length} differs from the checkpoint's {saved['seq_length']}")
        saved_tokenizer = metadata["tokenizer"]["name"]
        if not same_tokenizer(saved_tokenizer, self.tokenizer.name):
            problems.append(f"the tokenizer is {self.tokenizer.name}, the checkpoint was trained with {saved_tokenizer} "
                            f"(its copy: {directory / TOKENIZER_DIR})")
        sources = _data_sources(self.config)
        changed = [f"--{'data-schedule' if key == 'stages' else key.replace('_', '-')}" for key in DATA_SOURCES
                   if saved["sources"].get(key) != sources[key]]
        fingerprint = saved["fingerprint"]
        if not problems and fingerprint["sha256"] is not None:
            now = data_fingerprint(train_dataset, fingerprint["start"], fingerprint["end"])
            if now != fingerprint["sha256"]:
                because = (f"{', '.join(changed)} changed" if changed else
                           "the data files changed, or the sample count requested (--train-iters × "
                           "--global-batch-size) changed Megatron's epoch plan")
                problems.append(
                    f"training samples {fingerprint['start']}..{fingerprint['end'] - 1} are not those the checkpoint "
                    f"was trained around ({because})"
                )
        if problems:
            message = (f"--load {directory}: the training data differs from the checkpoint's: "
                       f"{'; '.join(problems)}")
            if not self.flags.override_data_on_resume:
                raise TrainingCheckpointError(
                    f"{message}. Resuming would not read the samples the interrupted run would have read; "
                    f"restore the original settings, or pass --override-data-on-resume to continue at sample "
                    f"{metadata['train_state']['consumed_samples']} of the new data"
                )
            logger.warning("%s; continuing at sample %d of the new data (--override-data-on-resume)", message,
                           metadata["train_state"]["consumed_samples"])
        if saved["global_batch_size"] != global_batch_size:
            logger.info("global batch size %d -> %d: training continues at sample %d; the learning-rate schedule "
                        "counts iterations", saved["global_batch_size"], global_batch_size,
                        metadata["train_state"]["consumed_samples"])

    def _model_and_optimizer_state(self, with_optimizer: bool, options: Any = None) -> dict[str, Any]:
        """The stateful pieces that save writes and load fills: "model", and "optimizer" (once it has
        moments), as torch.distributed.checkpoint's state dicts of this rank."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if with_optimizer:
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
            return {"model": model_state, "optimizer": optimizer_state}
        return {"model": get_model_state_dict(self.model, options=options)}

    def _load_model_and_optimizer(self, directory: Path, metadata: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict, set_state_dict,
        )

        with_optimizer = metadata["has_optimizer_state"]
        sharded = metadata["checkpoint_type"] in SHARDED_TYPES
        # The command line decides the hyperparameters; the checkpoint provides moments and steps.
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        if sharded:  # every rank reads its shards into its state dicts
            into = self._model_and_optimizer_state(with_optimizer)
            state = read_state(directory, metadata["checkpoint_type"], into, self.model_config, agree=self._agree)
        else:  # rank 0 reads the file; set_*_state_dict below broadcast it and keep each rank's shard
            state, error = {key: {} for key in ("model", "optimizer")[: 1 + with_optimizer]}, None
            if self.ctx.rank == 0:
                try:
                    state = read_state(directory, metadata["checkpoint_type"], state, self.model_config)
                except TrainingCheckpointError as exc:
                    error = str(exc)
            self._agree(error)
        if sharded and with_optimizer:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
        elif sharded:
            set_model_state_dict(self.model, state["model"])
        else:
            # Two calls: set_state_dict treats the other ranks' empty model state as "optimizer only".
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            if with_optimizer:
                set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
            set_model_state_dict(self.model, state["model"], options=options)
        del state
        for group, values in zip(self.optimizer.param_groups, hyperparameters):
            group.update(values)

    # --- save ---------------------------------------------------------------------------------------

    def save(self, state: TrainState) -> None:
        """Write a checkpoint of ``state`` (in the background with --async-save)."""
        assert self.save_dir is not None
        self.wait()  # one background save at a time: the previous one is published first
        self._agree(self._on_rank0(lambda: self._space_for_save(state.iteration)))
        final = self.save_dir / iteration_dir_name(state.iteration)
        temporary = self.save_dir / f"{TMP_PREFIX}{final.name}"
        pending = _PendingSave(state.iteration, temporary, final, time.perf_counter())
        self.last_saved_iteration = state.iteration
        # Before the first optimizer step there are no moments; saving them would need a fake step.
        with_optimizer = bool(self.optimizer.state)
        cleanup = lambda: shutil.rmtree(temporary, ignore_errors=True)  # noqa: E731
        self._agree(self._on_rank0(lambda: self._write_metadata_files(temporary, self._metadata(state, with_optimizer))),
                    cleanup)
        error = _capture(lambda: _write_rng(temporary, self.ctx.rank))
        self._agree(error and f"cannot write {temporary / RNG_DIR}: {error}", cleanup)
        write = self._save_sharded if self.flags.checkpoint_type in SHARDED_TYPES else self._save_full

        def start_writing() -> None:
            pending.future = write(temporary, with_optimizer)

        pending.error = _failure_of(start_writing)
        self._pending = pending
        if not self._async:
            self.wait()

    def _save_sharded(self, temporary: Path, with_optimizer: bool) -> Future | None:
        import torch.distributed.checkpoint as dcp

        payload = self._model_and_optimizer_state(with_optimizer)
        location = str(temporary / SHARDED_STATE)
        if self._async:
            # Staging copies the state to host memory before returning; training may then change it.
            return dcp.async_save(payload, checkpoint_id=location, process_group=self._async_group)
        dcp.save(payload, checkpoint_id=location)
        return None

    def _save_full(self, temporary: Path, with_optimizer: bool) -> Future | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        payload = self._model_and_optimizer_state(with_optimizer, StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ctx.rank != 0:
            return None
        if getattr(self.model_config, "tie_embeddings", False):
            payload["model"].pop("lm_head.weight", None)  # the embedding; restored by read_state
        path = temporary / FULL_STATE
        if self._writer is not None:
            # On one process the gathered tensors may be the live parameters: copy before training moves on.
            payload = _clone_tensors(payload)
            return self._writer.submit(torch.save, payload, path)
        torch.save(payload, path)
        return None

    def has_unpublished_save(self) -> bool:
        return self._pending is not None

    def background_write_running(self) -> bool:
        """This rank still writes the last save in the background (--async-save)."""
        pending = self._pending
        return pending is not None and pending.future is not None and not pending.future.done()

    def wait(self) -> None:
        """Wait for the background save (if any) on every rank, then publish it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = pending.error
        if pending.future is not None:
            error = _failure_of(pending.future.result)
        previous = self._describe_latest()
        saving_failed = f"saving the checkpoint of iteration {pending.iteration} to {pending.temporary} failed"

        def remove_temporary() -> None:
            shutil.rmtree(pending.temporary, ignore_errors=True)

        self._agree(error and f"{saving_failed}: {error}; {previous}", cleanup=remove_temporary)
        error = self._write_checksums(pending.temporary)
        self._agree(error and f"{saving_failed}: {error}; {previous}", cleanup=remove_temporary)
        error = self._on_rank0(lambda: _publish(pending.temporary, pending.final, self.flags.keep_last_k))
        self._agree(error and f"publishing checkpoint {pending.final} failed: {error}; {previous}",
                    cleanup=remove_temporary)
        if self.ctx.rank == 0:
            self._published_bytes = _directory_bytes(pending.final)
        logger.info("saved checkpoint %s (%.1f s%s)", pending.final, time.perf_counter() - pending.started,
                    ", written in the background" if pending.future is not None else "")

    def _write_checksums(self, temporary: Path) -> str | None:
        """Every rank checksums its share of the finished files; rank 0 writes them all to checksums.json.
        Returns an error message (for _agree) or None."""
        sums: dict[str, Any] = {}
        error = None
        try:
            for name in _share(_checkpoint_files(temporary), self.ctx.rank, self.ctx.world_size):
                sums[name] = _file_checksum(temporary / name)
        except OSError as exc:
            error = f"cannot checksum the written files: {_describe_failure(exc)}"
        shares = [(sums, error)]
        if self._distributed():
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, (sums, error))
        failed = [message for _, message in shares if message]
        if failed:
            return failed[0]
        merged = {name: value for share, _ in shares for name, value in share.items()}
        return self._on_rank0(lambda: _write_bytes_durably(temporary / CHECKSUMS,
                                                           json.dumps(merged, indent=1, sort_keys=True).encode()))

    def _describe_latest(self) -> str:
        assert self.save_dir is not None
        latest = self.save_dir / LATEST
        try:
            name = latest.read_text().strip()
        except OSError:
            return f"{self.save_dir} holds its previous checkpoints unchanged (none yet)"
        return f"{self.save_dir} holds its previous checkpoints unchanged (latest: {name})"

    def _metadata(self, state: TrainState, with_optimizer: bool) -> dict[str, Any]:
        config, tokenizer_flags = self.config, self.config.tokenizer
        consumed = state.consumed_samples
        dataset_size = len(self._train_dataset) if self._train_dataset is not None else consumed
        start = max(0, min(consumed, dataset_size) - FINGERPRINT_SAMPLES)
        end = min(dataset_size, consumed + FINGERPRINT_SAMPLES)
        fingerprint = data_fingerprint(self._train_dataset, start, end) if self._train_dataset is not None else None
        files = tokenizer_files(tokenizer_flags.tokenizer_type, tokenizer_flags.tokenizer_model)
        tokenizer_model = tokenizer_flags.tokenizer_model
        if tokenizer_model and not Path(tokenizer_model).is_dir():
            saved_model = f"{TOKENIZER_DIR}/{Path(tokenizer_model).name}"
        else:
            saved_model = TOKENIZER_DIR if files else None
        return {
            "format_version": FORMAT_VERSION,
            "checksums": CHECKSUMS,  # written after every other file, when the save is complete
            "kotomamba_version": __version__,
            "torch_version": torch.__version__,
            "mamba_ssm_version": _package_version("mamba_ssm"),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "iteration": state.iteration,
            "checkpoint_type": self.flags.checkpoint_type,
            "world_size": self.ctx.world_size,
            "has_optimizer_state": with_optimizer,
            "train_state": dataclasses.asdict(state),
            "loss_scaler": self.scaler.state_dict(),
            "tokenizer": {
                "type": tokenizer_flags.tokenizer_type,
                "name": self.tokenizer.name,
                "vocab_size": self.tokenizer.vocab_size,
                "original_model": tokenizer_model,
                "saved_model": saved_model,  # relative to the checkpoint directory
                "files": [path.name for path in files],
                "null_vocab_size": config.model.vocab_size,
            },
            "data": {
                "seq_length": config.data.seq_length,
                "global_batch_size": config.batch.global_batch_size,
                "sources": _data_sources(config),
                "fingerprint": {"start": start, "end": end, "sha256": fingerprint},
            },
            "config": config_dict(config),
        }

    def _write_metadata_files(self, temporary: Path, metadata: dict[str, Any]) -> None:
        import yaml

        if temporary.exists():  # an earlier attempt at the same iteration
            shutil.rmtree(temporary)
        (temporary / TOKENIZER_DIR).mkdir(parents=True)
        (temporary / SHARDED_STATE if metadata["checkpoint_type"] in SHARDED_TYPES else temporary).mkdir(exist_ok=True)
        for path in tokenizer_files(self.config.tokenizer.tokenizer_type, self.config.tokenizer.tokenizer_model):
            shutil.copy2(path, temporary / TOKENIZER_DIR / path.name)
        _write_bytes_durably(temporary / MODEL_CONFIG, json.dumps(_config_dict(self.model_config), indent=2).encode())
        _write_bytes_durably(temporary / CONFIG_YAML,
                             yaml.safe_dump(metadata["config"], sort_keys=True, allow_unicode=True).encode())
        _write_bytes_durably(temporary / METADATA, json.dumps(metadata, indent=2).encode())

    def finish(self, state: TrainState) -> None:
        """End of the loop: save the final state (unless just saved) and wait for background writes."""
        if self.save_dir is not None and self.last_saved_iteration != state.iteration:
            self.save(state)
        self.wait()
        if self._writer is not None:
            self._writer.shutdown()
        if self._async_group is not None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None


def _write_rng(temporary: Path, rank: int) -> None:
    path = _rng_file(temporary, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), path)


def _capture(action: Callable[[], Any]) -> str | None:
    """Run ``action``; an OSError (or TrainingCheckpointError) becomes its message, for ``_agree``."""
    try:
        action()
    except TrainingCheckpointError as error:
        return str(error)
    except OSError as error:
        return _describe_failure(error)
    return None


def _clone_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(item) for item in value)
    return value


def _config_dict(model_config: Any) -> dict[str, Any]:
    """A mamba-ssm MambaConfig as its config.json dict (what save_pretrained writes), JSON-normalized."""
    values = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(vars(model_config))
    return json.loads(json.dumps(values))


def _data_sources(config: RunConfig) -> dict[str, Any]:
    """The flags that choose the training data order, as plain JSON values (flat, as every format version
    wrote them)."""
    values = config_dict(config)["data"]
    return {key: values[key] for key in DATA_SOURCES}


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
