"""Tokenize JSONL documents into Megatron `.bin/.idx` indexed datasets.

Flags follow Megatron-LM's tools/preprocess_data.py. For every key in `--json-keys` this writes
`<output-prefix>_<key>_document.bin/.idx`, one sequence per JSON line (document-level, no sentence
splitting). The output is byte-identical whatever `--workers` and `--partitions` are: inputs are read
in sorted-file, line order and results are written in that order.

    python -m megatron_lm.tools.preprocess_data --input 'data/*.jsonl.gz' --output-prefix out/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import bisect
import collections
import gzip
import glob
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from megatron_lm.indexed_dataset import (
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_token_dtype,
    data_file_path,
    index_file_path,
)
from megatron_lm.tokenizer import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer
from kotomamba.errors import KotomambaError

# Lines per task sent to a worker: large enough to amortize inter-process overhead.
_BATCH_LINES = 256
# Invalid lines reported one by one with --skip-invalid before only counting them.
_MAX_SKIP_WARNINGS = 10


class PreprocessError(KotomambaError):
    """Bad input or arguments; the message names the file and line, or the flag."""


@dataclass(frozen=True)
class Segment:
    """A run of whole lines of one input file: bytes [start, end); end None = to the end of the file.
    Compressed files are never split."""

    path: str
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker process needs to rebuild the tokenizer."""

    tokenizer_type: str
    tokenizer_model: str | None
    vocab_size: int | None
    vocab_extra_ids: int

    def build(self) -> Tokenizer:
        extra = {"vocab_extra_ids": self.vocab_extra_ids} if self.vocab_extra_ids else {}
        return build_tokenizer(self.tokenizer_type, self.tokenizer_model, self.vocab_size, **extra)


@dataclass(frozen=True)
class PartitionJob:
    label: str  # prefix for log lines
    segments: tuple[Segment, ...]
    output_prefixes: tuple[str, ...]  # one per json key
    tokenizer: TokenizerSpec
    json_keys: tuple[str, ...]
    append_eod: bool
    dtype: np.dtype
    workers: int
    skip_invalid: bool
    log_interval: int


@dataclass
class PartitionStats:
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    bytes_read: int = 0


# A raw input line and where it comes from: (segment index, 0-based line index within the segment, bytes).
RawLine = tuple[int, int, bytes]


@dataclass(frozen=True)
class EncodedBatch:
    """The result for a batch of lines, packed into few arrays so that it crosses processes cheaply."""

    positions: list[tuple[int, int]]  # (segment index, line index) of every line of the batch
    num_bytes: int
    errors: dict[int, str]  # batch position -> why that line is invalid
    tokens: list[np.ndarray]  # per json key: the valid lines' tokens back to back
    lengths: list[np.ndarray]  # per json key: token count of each valid line


class _InvalidLine(Exception):
    pass


def _tokenize_failure(text: str, exc: Exception) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as bad:
        return f"unpaired surrogate {text[bad.start]!r} at character {bad.start} (from a JSON \\u escape)"
    return str(exc)


class LineEncoder:
    """Turns raw JSONL lines into one token array per json key, or the reason a line is invalid."""

    def __init__(self, tokenizer: Tokenizer, json_keys: Sequence[str], append_eod: bool, dtype: np.dtype):
        self.tokenizer = tokenizer
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod
        self.dtype = dtype

    def encode_batch(self, batch: list[RawLine]) -> EncodedBatch:
        errors: dict[int, str] = {}
        documents_per_key: list[list[list[int]]] = [[] for _ in self.json_keys]
        for position, (_, _, raw) in enumerate(batch):
            try:
                documents = self.encode_line(raw)
            except _InvalidLine as exc:
                errors[position] = str(exc)
                continue
            for per_key, ids in zip(documents_per_key, documents):
                per_key.append(ids)
        return EncodedBatch(
            positions=[(segment_index, line_index) for segment_index, line_index, _ in batch],
            num_bytes=sum(len(raw) for _, _, raw in batch),
            errors=errors,
            tokens=[np.fromiter(itertools.chain.from_iterable(docs), self.dtype) for docs in documents_per_key],
            lengths=[np.fromiter(map(len, docs), np.int64, len(docs)) for docs in documents_per_key],
        )

    def encode_line(self, raw: bytes) -> list[list[int]]:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _InvalidLine(f"invalid UTF-8 at byte {exc.start} of the line") from None
        if not line.strip():
            raise _InvalidLine("empty line (expected a JSON object)")
        try:
            record = json.loads(line.rstrip("\r\n"))  # a string left open names itself, not the newline
        except json.JSONDecodeError as exc:
            # json's messages may end in "at" themselves ("Unterminated string starting at")
            where = "column" if exc.msg.endswith(" at") else "at column"
            raise _InvalidLine(f"malformed JSON: {exc.msg} {where} {exc.colno}") from None
        if not isinstance(record, dict):
            raise _InvalidLine(f"expected a JSON object, got {type(record).__name__}")
        documents = []
        for key in self.json_keys:
            if key not in record:
                raise _InvalidLine(f"missing key {key!r} (--json-keys)")
            text = record[key]
            if not isinstance(text, str):
                raise _InvalidLine(f"key {key!r} holds {type(text).__name__}, not a string")
            try:
                ids = self.tokenizer.encode(text)
            except (TokenizerError, UnicodeEncodeError, RuntimeError) as exc:  # RuntimeError: SentencePiece
                raise _InvalidLine(f"cannot tokenize key {key!r}: {_tokenize_failure(text, exc)}") from None
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
            documents.append(ids)
        return documents


# Set once per worker process by the pool initializer, so tasks carry only their lines.
_worker_encoder: LineEncoder | None = None


def _init_worker(spec: TokenizerSpec, json_keys: tuple[str, ...], append_eod: bool, dtype: np.dtype) -> None:
    global _worker_encoder
    _worker_encoder = LineEncoder(spec.build(), json_keys, append_eod, dtype)


def _encode_in_worker(batch: list[RawLine]) -> EncodedBatch:
    return _worker_encoder.encode_batch(batch)


def _in_order(executor: ProcessPoolExecutor, function: Callable[[Any], Any], items: Iterator, window: int) -> Iterator:
    """Like multiprocessing's imap: results in input order, at most `window` tasks in flight. Unlike
    imap, a worker that dies raises BrokenProcessPool instead of hanging."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(executor.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _open_input(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_batches(segments: Sequence[Segment], batch_lines: int) -> Iterator[list[RawLine]]:
    batch: list[RawLine] = []
    for segment_index, segment in enumerate(segments):
        try:
            with _open_input(segment.path) as f:
                f.seek(segment.start)
                remaining = None if segment.end is None else segment.end - segment.start
                for line_index, line in enumerate(f):
                    batch.append((segment_index, line_index, line))
                    if len(batch) == batch_lines:
                        yield batch
                        batch = []
                    if remaining is not None:
                        remaining -= len(line)
                        if remaining <= 0:
                            break
        except (OSError, EOFError, zlib.error) as exc:
            raise PreprocessError(f"{segment.path}: cannot read: {exc}") from None
    if batch:
        yield batch


def _count_newlines(path: str, end: int) -> int:
    count = 0
    with open(path, "rb") as f:
        while end > 0:
            block = f.read(min(end, 1 << 22))
            if not block:
                break
            count += block.count(b"\n")
            end -= len(block)
    return count


def _next_line_start(path: str, offset: int) -> int:
    """The first line boundary at or after `offset` in an uncompressed file."""
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()
        return f.tell()


def plan_partitions(paths: Sequence[str], partitions: int) -> list[tuple[Segment, ...]]:
    """Split the concatenated inputs into at most `partitions` contiguous runs of whole lines of
    about equal size. Compressed files go whole into one partition."""
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    if partitions <= 1 or total == 0:
        return [tuple(Segment(p) for p in paths)]
    file_starts = [0]
    for size in sizes:
        file_starts.append(file_starts[-1] + size)
    cuts = {0, total}
    for k in range(1, partitions):
        target = total * k // partitions
        i = bisect.bisect_right(file_starts, target) - 1
        local = target - file_starts[i]
        if local == 0:
            cuts.add(target)
        elif paths[i].endswith(".gz"):
            cuts.add(file_starts[i + 1])
        else:
            cuts.add(file_starts[i] + _next_line_start(paths[i], local))
    ordered = sorted(cuts)
    plan = []
    for lo, hi in zip(ordered, ordered[1:]):
        segments = []
        for path, size, file_start in zip(paths, sizes, file_starts):
            start, end = max(lo, file_start) - file_start, min(hi, file_start + size) - file_start
            if start < end:
                segments.append(Segment(path, start, None if end == size else end))
        if segments:
            plan.append(tuple(segments))
    return plan


def process_partition(job: PartitionJob) -> PartitionStats:
    """Tokenize one partition's lines in order into one `.bin/.idx` pair per json key."""
    stats = PartitionStats()
    first_lines: dict[int, int] = {}  # segment index -> 1-based number of its first line in the file

    def location(segment_index: int, line_index: int) -> str:
        segment = job.segments[segment_index]
        if segment_index not in first_lines:
            first_lines[segment_index] = 1 + (_count_newlines(segment.path, segment.start) if segment.start else 0)
        return f"{segment.path}:{first_lines[segment_index] + line_index}"

    # Progress in percent only where the input size is known (not for compressed files).
    partition_bytes = None
    if not any(s.path.endswith(".gz") for s in job.segments):
        partition_bytes = sum((s.end if s.end is not None else os.path.getsize(s.path)) - s.start for s in job.segments)
    batches = _read_batches(job.segments, _BATCH_LINES)
    started = time.perf_counter()
    with ExitStack() as cleanup:  # stops the workers and discards unfinished outputs on any error
        builders = [
            cleanup.enter_context(IndexedDatasetBuilder(data_file_path(prefix), job.dtype))
            for prefix in job.output_prefixes
        ]
        if job.workers > 1:
            executor = ProcessPoolExecutor(
                job.workers,
                initializer=_init_worker,
                initargs=(job.tokenizer, job.json_keys, job.append_eod, job.dtype),
            )
            cleanup.callback(executor.shutdown, wait=True, cancel_futures=True)
            results = _in_order(executor, _encode_in_worker, batches, window=2 * job.workers)
        else:
            encoder = LineEncoder(job.tokenizer.build(), job.json_keys, job.append_eod, job.dtype)
            results = map(encoder.encode_batch, batches)
        for batch in results:
            stats.bytes_read += batch.num_bytes
            starts = [np.concatenate(([0], np.cumsum(lengths))) for lengths in batch.lengths]
            document = 0  # index among the batch's valid lines
            for position, (segment_index, line_index) in enumerate(batch.positions):
                if position in batch.errors:
                    where = location(segment_index, line_index)
                    if not job.skip_invalid:
                        raise PreprocessError(f"{where}: {batch.errors[position]} (--skip-invalid skips such lines)")
                    stats.skipped += 1
                    if stats.skipped <= _MAX_SKIP_WARNINGS:
                        print(f"warning: {where}: {batch.errors[position]} (skipped)", file=sys.stderr)
                    if stats.skipped == _MAX_SKIP_WARNINGS:
                        print(f"{job.label}further invalid lines are skipped silently", file=sys.stderr)
                    continue
                for builder, tokens, key_starts in zip(builders, batch.tokens, starts):
                    start, end = key_starts[document], key_starts[document + 1]
                    if end > start:
                        builder.add_item(tokens[start:end])
                    builder.end_document()
                    stats.tokens += int(end - start)
                document += 1
                stats.documents += 1
                if job.log_interval > 0 and stats.documents % job.log_interval == 0:
                    _log_progress(job.label, stats, time.perf_counter() - started, partition_bytes)
        for builder, prefix in zip(builders, job.output_prefixes):
            builder.finalize(index_file_path(prefix))
    return stats


def _log_progress(label: str, stats: PartitionStats, elapsed: float, total_bytes: int | None) -> None:
    elapsed = max(elapsed, 1e-9)
    progress = f", {100 * stats.bytes_read / total_bytes:.1f}% of input" if total_bytes else ""
    print(
        f"{label}{stats.documents} documents, {stats.tokens} tokens "
        f"({stats.documents / elapsed:.0f} docs/s, {stats.bytes_read / elapsed / 1e6:.2f} MB/s{progress})",
        file=sys.stderr,
        flush=True,
    )


def resolve_inputs(pattern: str) -> list[str]:
    """A path, or a glob whose matches are taken in sorted order."""
    if os.path.isfile(pattern):
        return [pattern]
    matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not matches:
        raise PreprocessError(f"--input {pattern!r} matches no file")
    return matches


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, help="JSONL file (.jsonl or .jsonl.gz) or a glob of them")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset per key")
    group.add_argument("--skip-invalid", action="store_true", help="skip and count malformed lines, don't stop")
    group.add_argument("--allow-empty", action="store_true",
                       help="write the (valid, empty) dataset when the input holds no tokens at all; by default "
                            "that is an error and nothing is written, since training would refuse it later")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="SentencePiece model, tokenizer.json or HF tokenizer directory")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer only")
    group.add_argument("--vocab-extra-ids", type=int, default=0, help="SentencePieceTokenizer only")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document id to non-empty documents")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes in all")
    group.add_argument("--partitions", type=int, default=1, help="input parts processed in parallel, then merged")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines (0: none)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.partitions < 1:
        parser.error(f"--partitions must be >= 1, got {args.partitions}")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys has duplicates: {args.json_keys}")
    return args


def run(args: argparse.Namespace) -> PartitionStats:
    """Preprocess as `args` say; returns the totals. Outputs appear only if everything succeeded."""
    inputs = resolve_inputs(args.input)
    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_size, args.vocab_extra_ids)
    tokenizer = spec.build()
    dtype = np.dtype(best_token_dtype(tokenizer.vocab_size))
    output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(output_dir):
        problem = "is not a directory" if os.path.exists(output_dir) else "does not exist"
        raise PreprocessError(f"--output-prefix {args.output_prefix!r}: directory {output_dir} {problem}")
    final_prefixes = [f"{args.output_prefix}_{key}_document" for key in args.json_keys]

    # Staging beside the outputs keeps the final renames atomic (same file system).
    try:
        staging = tempfile.mkdtemp(prefix=".preprocess-", dir=output_dir)
    except OSError as error:
        raise PreprocessError(f"--output-prefix {args.output_prefix!r}: cannot create files in {output_dir}: "
                              f"{error.strerror or error}") from None
    try:
        merged_prefixes = [os.path.join(staging, f"all_{i}") for i in range(len(args.json_keys))]
        plan = plan_partitions(inputs, args.partitions)
        jobs = [
            PartitionJob(
                label=f"[partition {n + 1}/{len(plan)}] " if len(plan) > 1 else "",
                segments=segments,
                output_prefixes=tuple(
                    os.path.join(staging, f"part{n}_{i}") if len(plan) > 1 else merged_prefixes[i]
                    for i in range(len(args.json_keys))
                ),
                tokenizer=spec,
                json_keys=tuple(args.json_keys),
                append_eod=args.append_eod,
                dtype=dtype,
                workers=max(1, args.workers // len(plan)),
                skip_invalid=args.skip_invalid,
                log_interval=args.log_interval,
            )
            for n, segments in enumerate(plan)
        ]
        if len(jobs) == 1:
            results = [process_partition(jobs[0])]
        else:
            with ProcessPoolExecutor(max_workers=len(jobs)) as executor:
                futures = [executor.submit(process_partition, job) for job in jobs]
                try:
                    results = [future.result() for future in futures]
                except BaseException:
                    executor.shutdown(cancel_futures=True)
                    raise
            for i, merged in enumerate(merged_prefixes):
                with IndexedDatasetBuilder(data_file_path(merged), dtype) as builder:
                    for job in jobs:
                        builder.add_index(job.output_prefixes[i])
                    builder.finalize(index_file_path(merged))
        if not args.allow_empty and sum(r.tokens for r in results) == 0:
            documents = sum(r.documents for r in results)
            raise PreprocessError(
                f"--input {args.input}: {documents} document(s) and no tokens (an empty input, or the wrong "
                f"--json-keys {' '.join(args.json_keys)}?); nothing was written. --allow-empty writes the empty dataset")
        for staged, final in zip(merged_prefixes, final_prefixes):
            _publish(staged, final)
    except OSError as error:  # a full disk, the output directory removed or made read-only under us
        raise PreprocessError(f"writing {error.filename or output_dir}: {error.strerror or error}; "
                              f"nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PartitionStats(
        documents=sum(r.documents for r in results),
        tokens=sum(r.tokens for r in results),
        skipped=sum(r.skipped for r in results),
        bytes_read=sum(r.bytes_read for r in results),
    )


def _publish(staged_prefix: str, final_prefix: str) -> None:
    # Old index first, new index last: at no moment does a new .bin sit beside a stale .idx.
    final_index = index_file_path(final_prefix)
    if os.path.exists(final_index):
        os.remove(final_index)
    os.replace(data_file_path(staged_prefix), data_file_path(final_prefix))
    os.replace(index_file_path(staged_prefix), final_index)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        stats = run(args)
    except KotomambaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print("error: a worker process died (killed, or out of memory?); no output was written", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    outputs = ", ".join(f"{args.output_prefix}_{key}_document.{{bin,idx}}" for key in args.json_keys)
    print(
        f"done: {stats.documents} documents, {stats.tokens} tokens, {stats.skipped} skipped, "
        f"{seconds:.2f} s, {stats.tokens / max(seconds, 1e-9):.0f} tokens/s -> {outputs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
