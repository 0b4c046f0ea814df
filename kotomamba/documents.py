"""Documents packed into one training sequence, kept apart (--reset-state-at-eod).

Megatron-style data packs documents end to end, separated by EOD tokens. With the reset, each Mamba
layer starts every document from a zero state (and its short convolution sees nothing of the document
before): position t's document index ``seq_idx[b, t]`` is the number of EODs before t in row b, and
the kernels reset where it changes. mamba-ssm's modules take no such input for Mamba-1 and none in
their fused training path, so the index reaches the kernels the way the kernels themselves are
routed (kotomamba.kernels): the training step sets it around each micro-batch's forward and backward
with :func:`packed_documents`, and the routed kernel entry points read :func:`active_document_index`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The document index of the micro-batch being trained or evaluated; a plain module global (not a
# context variable): on a GPU, autograd runs the backward on its own thread.
_active: torch.Tensor | None = None


def document_index(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """(batch, seqlen) int32 on `tokens`' device: how many EOD tokens come before each position in its row
    (the EOD itself still belongs to the document it ends). No host synchronization."""
    is_eod = (tokens == eod).to(torch.int32)
    return torch.cumsum(is_eod, dim=1, dtype=torch.int32) - is_eod


@contextlib.contextmanager
def packed_documents(seq_idx: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the routed Mamba kernels reset their state where `seq_idx` changes (None: off)."""
    global _active
    previous, _active = _active, seq_idx
    try:
        yield
    finally:
        _active = previous


def active_document_index() -> torch.Tensor | None:
    return _active


def document_spans(seq_idx: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each document: for the reference kernels, which run each document
    on its own (reads the index on the host: CPU tests, not GPU training)."""
    spans = []
    for row in seq_idx.cpu():
        starts = [0, *(torch.nonzero(torch.diff(row), as_tuple=True)[0] + 1).tolist()]
        spans.append(list(zip(starts, [*starts[1:], row.numel()])))
    return spans
