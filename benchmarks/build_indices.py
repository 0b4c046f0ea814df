"""Time the GPT index build for a 1e9-token, 1e7-document corpus (Megatron-compatible order).

The corpus is a real `.idx` (written here from the format doc, random document lengths) next to a
sparse `.bin` (a hole of the right size: index building never reads tokens), opened with
megatron_lm.indexed_dataset.IndexedDataset, so the timed code is exactly what GPTDataset runs.

    python benchmarks/build_indices.py [--tokens 1e9] [--documents 1e7] [--seq-length 2048]
"""
from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import markdown_table, write_section  # noqa: E402
from megatron_lm import helpers  # noqa: E402
from megatron_lm.data_builder import parse_split, split_ranges  # noqa: E402
from megatron_lm.gpt_dataset import (  # noqa: E402
    GPTDataset,
    GPTDatasetConfig,
    build_document_index,
    build_shuffle_index,
    plan_epochs,
)
from megatron_lm.indexed_dataset import IndexedDataset  # noqa: E402

_UINT16_CODE = 8


def write_synthetic_corpus(prefix: Path, num_tokens: int, num_documents: int, seed: int) -> None:
    """`.idx` with one sequence per document summing to exactly num_tokens; sparse uint16 `.bin`."""
    rng = np.random.default_rng(seed)
    mean = num_tokens / num_documents
    # mean slightly below the target, so topping up never shrinks a document below one token
    lengths = rng.integers(1, int(2 * mean) - 1, size=num_documents, dtype=np.int64)
    shortfall = num_tokens - int(lengths.sum())
    lengths += shortfall // num_documents
    lengths[: shortfall % num_documents] += 1
    assert lengths.min() >= 1 and int(lengths.sum()) == num_tokens
    pointers = np.zeros(num_documents, dtype=np.int64)
    np.cumsum(lengths[:-1] * 2, out=pointers[1:])
    with open(f"{prefix}.idx", "wb") as handle:
        handle.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, _UINT16_CODE, num_documents, num_documents + 1))
        handle.write(lengths.astype("<i4").tobytes())
        handle.write(pointers.astype("<i8").tobytes())
        handle.write(np.arange(num_documents + 1, dtype="<i8").tobytes())
    with open(f"{prefix}.bin", "wb") as handle:
        handle.truncate(num_tokens * 2)


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--documents", type=float, default=1e7)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--split", default="949,50,1")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    num_tokens, num_documents = int(args.tokens), int(args.documents)

    rows = []
    with tempfile.TemporaryDirectory(prefix="build_indices_") as workdir:
        prefix = Path(workdir) / "corpus"
        _, seconds = timed(lambda: write_synthetic_corpus(prefix, num_tokens, num_documents, args.seed))
        print(f"wrote synthetic corpus ({num_tokens:.3g} tokens, {num_documents:.3g} documents) in {seconds:.1f} s")
        indexed = IndexedDataset(str(prefix))
        train_ids = split_ranges(parse_split(args.split), len(indexed))[0]
        ids = np.arange(train_ids.start, train_ids.stop)
        tokens_per_epoch = int(indexed.sequence_lengths[train_ids.start : train_ids.stop].sum(dtype=np.int64))
        epoch_samples = (tokens_per_epoch - 1) // args.seq_length

        for label, num_samples in [("1 epoch", None), ("2.5 epochs", int(2.5 * epoch_samples))]:
            plan = plan_epochs(tokens_per_epoch, num_samples, args.seq_length, True)
            random_state = np.random.RandomState(args.seed)
            document_index, t_document = timed(lambda: build_document_index(ids, plan, random_state))
            sample_index, t_sample = timed(
                lambda: helpers.build_sample_idx(
                    indexed.sequence_lengths, document_index, args.seq_length, plan.num_epochs, tokens_per_epoch, True
                )
            )
            _, t_shuffle = timed(lambda: build_shuffle_index(plan, random_state))
            config = GPTDatasetConfig(seq_length=args.seq_length, seed=args.seed, cache_dir=f"{workdir}/cache")
            built, t_build = timed(lambda: GPTDataset(indexed, "train", train_ids, num_samples, config))
            _, t_load = timed(lambda: GPTDataset(indexed, "train", train_ids, num_samples, config))
            assert np.array_equal(built.sample_index, sample_index)
            rows.append([
                label, f"{len(document_index):,}", f"{len(built):,}", f"{t_document:.2f}", f"{t_sample:.2f}",
                f"{t_shuffle:.2f}", f"{t_build:.2f}", f"{t_load:.3f}",
            ])

        blend_size = 10_000_000
        _, t_blend = timed(lambda: helpers.build_blending_indices([0.5, 0.3, 0.2], blend_size))

    header = [
        "samples requested", "document index entries", "samples", "document index (s)", "sample index, C++ (s)",
        "shuffle index (s)", "whole GPTDataset build + cache write (s)", "cached load (s)",
    ]
    table = markdown_table(header, rows)
    body = (
        f"Synthetic corpus: {num_tokens:,} tokens in {num_documents:,} documents (random lengths, mean "
        f"{num_tokens / num_documents:.0f}), real `.idx` + sparse `.bin`; train split `{args.split}` = "
        f"{len(ids):,} documents, {tokens_per_epoch:,} tokens; seq length {args.seq_length}. The whole build "
        f"includes the token count, all three indices and writing the `.npy` cache.\n\n{table}\n\n"
        f"Greedy blend index, 3 datasets, {blend_size:,} positions (C++): {t_blend:.2f} s."
    )
    print(table)
    print(f"blend index, 3 datasets, {blend_size:,} positions: {t_blend:.2f} s")
    write_section("build_indices", "GPT index build (1e9 tokens, 1e7 documents)", body)


if __name__ == "__main__":
    main()
