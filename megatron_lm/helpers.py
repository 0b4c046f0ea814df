"""Typed entry points to the C++ index builders (`megatron_lm/_helpers`, built from helpers.cpp)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kotomamba.errors import KotomambaError

_REPO_ROOT = Path(__file__).resolve().parent.parent


class HelpersNotBuiltError(KotomambaError, ImportError):
    """The pybind11 extension megatron_lm._helpers has not been compiled."""


try:
    from megatron_lm import _helpers
except ImportError as error:
    raise HelpersNotBuiltError(
        f"megatron_lm._helpers (the C++ sample-index builder) is not compiled: {error}. Build it with "
        f"`cd {_REPO_ROOT} && pip install -e .` or `cd {_REPO_ROOT} && python setup.py build_ext --inplace`."
    ) from error


def _aligned_int32(array: np.ndarray) -> np.ndarray:
    # .idx arrays sit at odd byte offsets; C++ wants aligned, contiguous int32.
    return np.require(array, dtype=np.int32, requirements=["C_CONTIGUOUS", "ALIGNED"])


def build_sample_idx(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    add_extra_token: bool,
) -> np.ndarray:
    """(n+1, 2) rows of (position in document_index, token offset), n = (epochs*tokens - extra) // seq_length.

    int32 unless a position or a sequence length exceeds int32 (then int64), as in Megatron-LM.
    """
    return _helpers.build_sample_idx(
        _aligned_int32(sizes),
        _aligned_int32(document_index),
        int(seq_length),
        int(num_epochs),
        int(tokens_per_epoch),
        bool(add_extra_token),
    )


def build_blending_indices(weights: np.ndarray | list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend of `size` positions: (dataset id int16[size], sample within that dataset int64[size])."""
    return _helpers.build_blending_indices(np.asarray(weights, dtype=np.float64), int(size))
