"""Batches for the training loop, in Megatron's order.

Global batch b holds samples [b·GBS, (b+1)·GBS) of the (shuffled, blended) training dataset. Within it,
micro-step m of data-parallel rank r reads samples b·GBS + m·MBS·DP + r·MBS + [0, MBS). The set of
samples in a global batch therefore does not depend on the micro-batch size or the number of ranks,
which is what makes a 2-process run reproduce a 1-process run, and a resumed run its original.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class PretrainingSampler:
    """Megatron's `MegatronPretrainingSampler`: yields this rank's indices, one micro-batch at a time,
    starting after `consumed_samples` (the samples of all ranks already trained on)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (dataset size {total_samples})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} outside size {dp_size}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        return remaining // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        first = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + first, start + first + self.micro_batch_size))


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {
        "tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples]).astype(np.int64)),
    }
    if "dataset_id" in samples[0]:
        batch["dataset_id"] = torch.tensor([int(s["dataset_id"]) for s in samples], dtype=torch.int64)
    return batch


def build_loader(
    dataset: Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # Each iterator draws its workers' base seed: from its own generator, not the global one, so that
        # building a loader after a resume leaves the restored RNG stream where the uninterrupted run had it.
        # The samples themselves are fixed by Megatron's precomputed indices and use no randomness.
        generator=torch.Generator().manual_seed(0),
    )
