"""Throughput of the indexed dataset: building, opening, and random reads.

Builds a synthetic uint16 dataset (default 1e8 tokens in 1e6 documents, long-tailed lengths) in a
temporary directory with IndexedDatasetBuilder, then times random whole-sequence reads and random
`get(idx, offset, length=2049)` reads (one GPT sample of seq length 2048 plus the extra token), both
as bare zero-copy views and with the tokens touched (summed). Also times opening an index of
10 million sequences. Files stay in the page cache, so this measures the code, not the disk.

    python benchmarks/read_samples.py [--tokens 1e8] [--documents 1e6] [--reads 200000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import markdown_table, write_section  # noqa: E402
from megatron_lm.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)

SAMPLE_TOKENS = 2049
VOCAB_SIZE = 50257


def synthetic_lengths(rng: np.random.Generator, tokens: int, documents: int) -> np.ndarray:
    """Log-normal document lengths (mean tokens/documents, a tail past SAMPLE_TOKENS), summing to `tokens`."""
    raw = rng.lognormal(mean=0.0, sigma=1.5, size=documents)
    lengths = np.maximum(1, np.floor(raw / raw.sum() * tokens)).astype(np.int64)
    lengths[np.argmax(lengths)] += tokens - int(lengths.sum())
    return lengths


def build_per_document(prefix: str, tokens: np.ndarray, lengths: np.ndarray) -> float:
    """One add_item + end_document per document, as a preprocessing script does; returns seconds."""
    started = time.perf_counter()
    builder = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    for document in np.split(tokens, np.cumsum(lengths)[:-1]):
        builder.add_item(document)
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return time.perf_counter() - started


def build_in_bulk(prefix: str, sequences: int, tokens_per_sequence: int) -> float:
    """A many-sequence index written by add_document, a million sequences per document; returns seconds."""
    started = time.perf_counter()
    builder = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    block = 1_000_000
    for start in range(0, sequences, block):
        count = min(block, sequences - start)
        builder.add_document(np.zeros(count * tokens_per_sequence, np.uint16), [tokens_per_sequence] * count)
    builder.finalize(index_file_path(prefix))
    return time.perf_counter() - started


def reads_per_second(read: Callable[..., object], calls: list[tuple[int, ...]]) -> float:
    started = time.perf_counter()
    for arguments in calls:
        read(*arguments)
    return len(calls) / (time.perf_counter() - started)


def open_seconds(prefix: str, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dataset = IndexedDataset(prefix)
        best = min(best, time.perf_counter() - started)
        dataset.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=1e8)
    parser.add_argument("--documents", type=float, default=1e6)
    parser.add_argument("--reads", type=int, default=200_000, help="random reads per measurement")
    parser.add_argument("--index-sequences", type=float, default=1e7, help="sequences in the open-time index")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    tokens_wanted, documents = int(args.tokens), int(args.documents)
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as directory:
        prefix = os.path.join(directory, "synthetic")
        lengths = synthetic_lengths(rng, tokens_wanted, documents)
        tokens = rng.integers(0, VOCAB_SIZE, size=tokens_wanted, dtype=np.uint16)
        build_s = build_per_document(prefix, tokens, lengths)
        del tokens

        many_prefix = os.path.join(directory, "many_sequences")
        index_sequences = int(args.index_sequences)
        bulk_build_s = build_in_bulk(many_prefix, index_sequences, 2)

        with IndexedDataset(prefix) as dataset:
            sequence_calls = [(pick,) for pick in rng.integers(0, len(dataset), size=args.reads).tolist()]
            long_enough = np.flatnonzero(dataset.sequence_lengths >= SAMPLE_TOKENS)
            sample_picks = rng.choice(long_enough, size=args.reads)
            offsets = rng.integers(0, dataset.sequence_lengths[sample_picks] - SAMPLE_TOKENS + 1)
            sample_calls = [
                (pick, offset, SAMPLE_TOKENS) for pick, offset in zip(sample_picks.tolist(), offsets.tolist())
            ]

            rows = [
                ["build (add_item + end_document per document)", f"{documents / build_s:,.0f} docs/s",
                 f"{tokens_wanted / build_s / 1e6:,.1f} M tokens/s"],
                [f"build (add_document, {index_sequences:,} sequences of 2 tokens)",
                 f"{index_sequences / bulk_build_s / 1e6:,.1f} M sequences/s", ""],
                [f"open index, {documents:,} sequences in {documents:,} documents",
                 f"{open_seconds(prefix) * 1e3:,.2f} ms", "document index checked in full"],
                [f"open index, {index_sequences:,} sequences in {-(-index_sequences // 1_000_000)} documents",
                 f"{open_seconds(many_prefix) * 1e3:,.2f} ms", "no per-sequence work on open"],
                ["dataset[idx] (view)",
                 f"{reads_per_second(dataset.__getitem__, sequence_calls):,.0f} reads/s",
                 f"mean {dataset.num_tokens / len(dataset):,.0f} tokens"],
                ["dataset[idx] + sum",
                 f"{reads_per_second(lambda i: dataset[i].sum(), sequence_calls):,.0f} reads/s", ""],
                [f"get(idx, offset, {SAMPLE_TOKENS}) (view)",
                 f"{reads_per_second(dataset.get, sample_calls):,.0f} reads/s",
                 f"{long_enough.size:,} sequences >= {SAMPLE_TOKENS} tokens"],
                [f"get(idx, offset, {SAMPLE_TOKENS}) + sum",
                 f"{reads_per_second(lambda *call: dataset.get(*call).sum(), sample_calls):,.0f} reads/s",
                 ""],
            ]
            summary = (
                f"Dataset: {dataset.num_tokens:,} uint16 tokens, {len(dataset):,} documents of one sequence "
                f"(log-normal lengths), {args.reads:,} random reads per row, files in the page cache."
            )

    table = markdown_table(["operation", "rate", "note"], rows)
    print(summary)
    print(table)
    write_section("read_samples", "Indexed dataset: build, open, random reads", summary + "\n\n" + table)


if __name__ == "__main__":
    main()
