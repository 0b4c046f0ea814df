"""Chooses how mamba-ssm's kernels run: its CUDA/Triton kernels, or the pure-PyTorch references.

mamba-ssm imports its compiled extensions at import time (``import selective_scan_cuda`` in
``mamba_ssm/ops/selective_scan_interface.py``), so on a machine without them ``import mamba_ssm``
fails. ``select_kernel_backend`` must therefore be called BEFORE anything imports ``mamba_ssm``
(``kotomamba.model`` does the imports lazily and selects the default backend itself if nobody did).

On the reference backend we leave mamba-ssm's files untouched and:
  1. put stand-in modules for the missing compiled extensions into ``sys.modules`` (only so that
     the imports succeed; calling anything on them raises ``KernelRoutingError``), and
  2. rebind the kernel entry points, in every module that imported them by name, to the
     pure-PyTorch reference functions that mamba-ssm and causal-conv1d ship themselves
     (``REFERENCE_ROUTING`` below is the complete table). Where the shipped reference does not
     cover an argument the models use, a thin adapter in this file composes shipped references.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from kotomamba import documents
from kotomamba.arguments import SELECTIVE_SCAN_CHOICES
from kotomamba.errors import KotomambaError

logger = logging.getLogger(__name__)

CUDA_EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
FORCE_BACKEND_VARIABLE = "KOTOMAMBA_KERNEL_BACKEND"

# Mamba-3's TileLang / CuTe-DSL kernel modules: GPU-only, without references, and mamba-ssm imports
# them inside try/except. Marking them unimportable on the reference backend saves ~5 s per process.
GPU_DSL_KERNEL_MODULES = (
    "mamba_ssm.ops.tilelang.mamba3.mamba3_mimo",
    "mamba_ssm.ops.cute.mamba3.mamba3_step_fn",
)


class KernelRoutingError(KotomambaError, RuntimeError):
    """A kernel was called that the reference routing does not cover, or backends were mixed."""


class KernelsUnavailableError(KotomambaError, RuntimeError):
    """A GPU run was asked for but mamba-ssm's CUDA kernels are not installed."""


def _kotomamba(name: str) -> str:
    return f"kotomamba.kernels:{name}"


# Replacement of an entry point that has no pure-PyTorch reference anywhere: a stub whose call
# fails with a clear message instead of launching a Triton kernel on CPU tensors.
NO_REFERENCE = "no reference"

# (module that calls the kernel, name it imported, replacement "module:function" or NO_REFERENCE).
REFERENCE_ROUTING: tuple[tuple[str, str, str], ...] = (
    # Mamba-1 selective scan and its fused block
    ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn",
     "mamba_ssm.ops.selective_scan_interface:selective_scan_ref"),
    ("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn", _kotomamba("mamba_inner_fn_reference")),
    ("mamba_ssm.ops.selective_scan_interface", "causal_conv1d_fn", _kotomamba("causal_conv1d_fn_reference")),
    ("mamba_ssm.modules.mamba_simple", "selective_scan_fn",
     "mamba_ssm.ops.selective_scan_interface:selective_scan_ref"),
    ("mamba_ssm.modules.mamba_simple", "mamba_inner_fn", _kotomamba("mamba_inner_fn_reference")),
    ("mamba_ssm.modules.mamba_simple", "causal_conv1d_fn", _kotomamba("causal_conv1d_fn_reference")),
    ("mamba_ssm.modules.mamba_simple", "causal_conv1d_update", _kotomamba("causal_conv1d_update_reference")),
    ("mamba_ssm.modules.mamba_simple", "selective_state_update",
     _kotomamba("selective_state_update_reference")),
    ("mamba_ssm.modules.mamba_simple", "layer_norm_fn", _kotomamba("layer_norm_fn_reference")),
    ("mamba_ssm.modules.mamba_simple", "rms_norm_fn", _kotomamba("rms_norm_fn_reference")),
    # Add + norm (RMSNorm.forward looks rms_norm_fn up in layer_norm's globals)
    ("mamba_ssm.ops.triton.layer_norm", "layer_norm_fn", _kotomamba("layer_norm_fn_reference")),
    ("mamba_ssm.ops.triton.layer_norm", "rms_norm_fn", _kotomamba("rms_norm_fn_reference")),
    ("mamba_ssm.modules.block", "layer_norm_fn", _kotomamba("layer_norm_fn_reference")),
    ("mamba_ssm.models.mixer_seq_simple", "layer_norm_fn", _kotomamba("layer_norm_fn_reference")),
    ("mamba_ssm.models.mixer_seq_simple", "rms_norm_fn", _kotomamba("rms_norm_fn_reference")),
    # Gated RMSNorm of Mamba-2/3 (RMSNorm.forward looks rmsnorm_fn up in layernorm_gated's globals)
    ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn", "mamba_ssm.ops.triton.layernorm_gated:rms_norm_ref"),
    ("mamba_ssm.ops.triton.layernorm_gated", "layernorm_fn", NO_REFERENCE),
    # Mamba-2 (SSD)
    ("mamba_ssm.modules.mamba2", "mamba_chunk_scan_combined", _kotomamba("mamba_chunk_scan_combined_reference")),
    ("mamba_ssm.modules.mamba2", "mamba_split_conv1d_scan_combined",
     _kotomamba("mamba_split_conv1d_scan_combined_reference")),
    ("mamba_ssm.modules.mamba2", "causal_conv1d_fn", _kotomamba("causal_conv1d_fn_reference")),
    ("mamba_ssm.modules.mamba2", "causal_conv1d_update", _kotomamba("causal_conv1d_update_reference")),
    ("mamba_ssm.modules.mamba2", "causal_conv1d_varlen_states", NO_REFERENCE),
    ("mamba_ssm.modules.mamba2", "selective_state_update", _kotomamba("selective_state_update_reference")),
    # mamba-ssm's own SSD references call these by their module-global names
    ("mamba_ssm.ops.triton.ssd_combined", "causal_conv1d_fn", _kotomamba("causal_conv1d_fn_reference")),
    ("mamba_ssm.ops.triton.ssd_combined", "rmsnorm_fn", "mamba_ssm.ops.triton.layernorm_gated:rms_norm_ref"),
    ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined",
     _kotomamba("mamba_chunk_scan_combined_reference")),
    ("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined",
     _kotomamba("mamba_split_conv1d_scan_combined_reference")),
    ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update",
     _kotomamba("selective_state_update_reference")),
    # Package-root re-exports: code that looks kernels up after backend selection (transformers'
    # Mamba models resolve causal_conv1d.causal_conv1d_fn at import) must get the references too
    ("causal_conv1d", "causal_conv1d_fn", _kotomamba("causal_conv1d_fn_reference")),
    ("causal_conv1d", "causal_conv1d_update", _kotomamba("causal_conv1d_update_reference")),
    ("mamba_ssm", "selective_scan_fn", "mamba_ssm.ops.selective_scan_interface:selective_scan_ref"),
    ("mamba_ssm", "mamba_inner_fn", _kotomamba("mamba_inner_fn_reference")),
    # Attention layers of hybrid models (training already uses torch SDPA inside mha.py)
    ("mamba_ssm.modules.mha", "causal_conv1d_fn", _kotomamba("causal_conv1d_fn_reference")),
    ("mamba_ssm.modules.mha", "causal_conv1d_update", _kotomamba("causal_conv1d_update_reference")),
    ("mamba_ssm.modules.mha", "flash_attn_with_kvcache", _kotomamba("flash_attn_with_kvcache_reference")),
    # Mamba-3: mamba-ssm 2.3.2 ships no pure-PyTorch reference for its forward or step kernels
    ("mamba_ssm.modules.mamba3", "mamba3_siso_combined", NO_REFERENCE),
    ("mamba_ssm.modules.mamba3", "mamba3_mimo_combined", NO_REFERENCE),
    ("mamba_ssm.modules.mamba3", "mamba3_step_fn", NO_REFERENCE),
    ("mamba_ssm.modules.mamba3", "apply_rotary_qk_inference_fwd", NO_REFERENCE),
)

# Where "auto" runs kotomamba's scan: per compute capability that benchmarks/scan_kernels.py measured, the
# fewest channels per call (batch x d_inner) from which ours was faster on every benchmarked shape
# (docs/benchmarks.md); smaller calls run mamba-ssm's kernel. One H100 (sm_90): 1.12-1.13x at 65,536 channels
# and more (1.4b and 2.8b at micro batch 16), 0.47-1.01x below.
SCAN_MEASURED_FASTER: dict[tuple[int, int], int] = {(9, 0): 65536}

# Where mamba-ssm looks up the selective scan, and what kotomamba's Triton scan puts there. The
# compiled extension's stand-in carries mamba-ssm's own MambaInnerFn (Mamba-1's fused block: conv1d
# and projections stay mamba-ssm's) onto the Triton kernels; selective_scan_fn is rebound because
# mamba-ssm's SelectiveScanFn slices the final state out of the CUDA kernel's own layout.
SCAN_ROUTING: tuple[tuple[str, str, str], ...] = (
    ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn", "kotomamba.ops.selective_scan:selective_scan_fn"),
    ("mamba_ssm.modules.mamba_simple", "selective_scan_fn", "kotomamba.ops.selective_scan:selective_scan_fn"),
    ("mamba_ssm", "selective_scan_fn", "kotomamba.ops.selective_scan:selective_scan_fn"),
)
SCAN_EXTENSION_MODULE = "mamba_ssm.ops.selective_scan_interface"

# --reset-state-at-eod on mamba-ssm's CUDA kernels: the entry points that get the packed documents'
# index (kotomamba.documents). Mamba-1's scan reads it in kotomamba's own extension stand-in; its
# convolution runs on kotomamba's Triton kernel (kotomamba.ops.causal_conv1d) while documents are
# packed; Mamba-2's fused block takes seq_idx itself. On the reference backend the reference functions
# read it.
DOCUMENT_ROUTING: tuple[tuple[str, str, str], ...] = (
    ("mamba_ssm.ops.selective_scan_interface", "causal_conv1d_fwd_function",
     _kotomamba("causal_conv1d_fwd_with_documents")),
    ("mamba_ssm.ops.selective_scan_interface", "causal_conv1d_bwd_function",
     _kotomamba("causal_conv1d_bwd_with_documents")),
    ("mamba_ssm.modules.mamba2", "mamba_split_conv1d_scan_combined",
     _kotomamba("mamba_split_conv1d_scan_combined_with_documents")),
)
_routed_originals: dict[str, object] = {}  # what DOCUMENT_ROUTING replaced, by name

_active_backend: str | None = None
_active_scan: str | None = None
_auto_min_channels: int | None = None  # with _active_scan "auto": the calls that run kotomamba's


# ----------------------------------------------------------------------------------------------
# Backend selection


def select_kernel_backend(device: torch.device | str | None = None, allow_reference_on_gpu: bool = False,
                          selective_scan: str = "auto", documents: bool = False) -> str:
    """Pick the kernel backend for ``device`` and install it; returns "cuda" or "reference".

    Call this before anything imports ``mamba_ssm``. ``device`` None means "cuda" when a GPU is
    visible, else "cpu". On a GPU without mamba-ssm's CUDA extensions this logs a loud warning and
    raises ``KernelsUnavailableError`` unless ``allow_reference_on_gpu`` is set.

    ``KOTOMAMBA_KERNEL_BACKEND=reference`` in the environment forces the reference functions on a GPU
    too (logged): for checking the CUDA kernels against the reference on the same device.

    ``selective_scan`` (one of ``SELECTIVE_SCAN_CHOICES``, the ``--selective-scan`` flag) picks Mamba-1's
    scan: kotomamba's Triton kernel, mamba-ssm's, or "auto": on the GPUs in ``SCAN_MEASURED_FASTER`` ours for
    the calls it was measured faster on (resolved as "auto") and mamba-ssm's for the others, elsewhere
    mamba-ssm's (on the reference backend, its reference function).

    ``documents`` (--reset-state-at-eod) routes the packed documents' index to the kernels; on a GPU it
    needs kotomamba's scan for Mamba-1 layers (mamba-ssm's has no such input), which "auto" then picks.
    """
    global _active_backend, _active_scan, _auto_min_channels
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    forced = os.environ.get(FORCE_BACKEND_VARIABLE)
    if forced not in (None, "", "reference"):
        raise KernelRoutingError(f"{FORCE_BACKEND_VARIABLE}={forced!r}: the only value it takes is 'reference'")
    if forced == "reference":
        wanted = "reference"
        logger.warning("%s=reference: using the pure-PyTorch reference kernels on %s", FORCE_BACKEND_VARIABLE, device)
    elif device_type == "cuda" and _cuda_extensions_importable():
        wanted = "cuda"
    else:
        wanted = "reference"
    if device_type == "cuda" and wanted == "reference" and not forced:
        logger.warning(_MISSING_KERNELS_WARNING)
        if not allow_reference_on_gpu:
            raise KernelsUnavailableError(
                "mamba-ssm's CUDA kernels (selective_scan_cuda, causal_conv1d_cuda) are not importable on "
                "this GPU machine; install them (see the warning above) or explicitly allow the slow "
                "pure-PyTorch reference kernels on GPU"
            )
    if _active_backend is not None and _active_backend != wanted:
        raise KernelRoutingError(
            f"kernel backend {_active_backend!r} is already installed in this process; "
            f"cannot switch to {wanted!r} (select the backend once, before importing mamba_ssm)"
        )
    if documents and wanted == "cuda":
        if selective_scan == "mamba-ssm":
            raise KernelRoutingError("--reset-state-at-eod needs kotomamba's selective scan for Mamba-1 layers "
                                     "(mamba-ssm's takes no document index): use --selective-scan kotomamba or auto")
        selective_scan = "kotomamba" if selective_scan == "auto" else selective_scan
    scan = _resolve_selective_scan(selective_scan, torch.device(device), wanted)
    if _active_backend is not None:
        if _active_scan != scan:
            raise KernelRoutingError(
                f"the {_active_scan} selective scan is already installed in this process; cannot switch to {scan}"
            )
        if documents and wanted == "cuda":
            _install_document_routing()  # a no-op for calls outside kotomamba.documents.packed_documents
        return _active_backend
    if wanted == "reference":
        _install_reference_routing()
    if scan.startswith("kotomamba"):
        _install_scan_routing(deterministic=scan == "kotomamba-deterministic")
    elif scan == "auto":
        _auto_min_channels = _scan_min_channels(torch.device(device))
        _install_scan_routing(deterministic=False, min_channels=_auto_min_channels)
    if documents and wanted == "cuda":
        _install_document_routing()
    _active_backend, _active_scan = wanted, scan
    logger.info("kernel backend: %s", kernel_summary())
    return wanted


def _resolve_selective_scan(choice: str, device: torch.device, backend: str) -> str:
    """"kotomamba", "mamba-ssm" or "reference": which selective scan ``choice`` means here."""
    if choice not in SELECTIVE_SCAN_CHOICES:
        raise KernelRoutingError(f"--selective-scan {choice!r}: expected one of {', '.join(SELECTIVE_SCAN_CHOICES)}")
    theirs = "mamba-ssm" if backend == "cuda" else "reference"
    if choice == "mamba-ssm":
        return theirs
    if choice.startswith("kotomamba"):
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return choice
        raise KernelRoutingError(
            "--selective-scan kotomamba runs Triton kernels, which need a GPU (on a CPU only under Triton's "
            "interpreter, TRITON_INTERPRET=1, which is for tests: far too slow to train)"
        )
    if backend == "cuda" and torch.cuda.get_device_capability(device) in SCAN_MEASURED_FASTER:
        return "auto"
    return theirs


def _scan_min_channels(device: torch.device) -> int:
    return SCAN_MEASURED_FASTER[torch.cuda.get_device_capability(device)]


def kernel_backend() -> str:
    """The installed backend: "cuda", "reference", or "unselected"."""
    return _active_backend or "unselected"


def selective_scan_kernel() -> str:
    """Mamba-1's installed selective scan: "kotomamba", "kotomamba-deterministic", "auto" (kotomamba's for large
    calls, mamba-ssm's for the others), "mamba-ssm", "reference", or "unselected"."""
    return _active_scan or "unselected"


def kernel_summary() -> str:
    """The installed backend and selective scan, as the training log's setup line shows them."""
    if _active_backend is None:
        return "unselected"
    if _active_scan == "auto":
        scan = (f"kotomamba's Triton kernel for calls of {_auto_min_channels:,} channels (batch x d_inner) or more, "
                f"mamba-ssm's CUDA kernel below")
    else:
        scan = {"kotomamba": "kotomamba's Triton kernel",
                "kotomamba-deterministic": "kotomamba's Triton kernel, deterministic backward",
                "mamba-ssm": "mamba-ssm's CUDA kernel",
                "reference": "mamba-ssm's reference function"}[_active_scan]
    return f"{_backend_description(_active_backend)}; selective scan: {scan}"


def ensure_kernel_backend() -> str:
    """The installed backend, selecting the default one for this machine if none was selected."""
    return _active_backend or select_kernel_backend()


def _backend_description(backend: str) -> str:
    if backend == "cuda":
        return "cuda (mamba-ssm CUDA/Triton kernels)"
    return "reference (pure-PyTorch reference functions of mamba-ssm / causal-conv1d; slow, for CPU and debugging)"


_MISSING_KERNELS_WARNING = """
**********************************************************************************************
* WARNING: running on a GPU, but mamba-ssm's compiled CUDA kernels cannot be imported        *
*          (selective_scan_cuda from mamba-ssm and/or causal_conv1d_cuda from causal-conv1d). *
* Without them every selective scan runs as a slow pure-PyTorch loop (many times slower) and *
* uses far more memory. Install CUDA builds matching your torch and CUDA versions, e.g.:     *
*     pip install --no-build-isolation causal-conv1d mamba-ssm                               *
* (needs nvcc from a CUDA toolkit matching torch.version.cuda; see the mamba-ssm README),    *
* then check:  python -c "import selective_scan_cuda, causal_conv1d_cuda"                   *
**********************************************************************************************"""


def _is_stand_in(module: object) -> bool:
    return isinstance(module, _MissingExtension)


def _cuda_extensions_importable() -> bool:
    for name in CUDA_EXTENSIONS:
        if _is_stand_in(sys.modules.get(name)):
            return False
        try:
            importlib.import_module(name)
        except ImportError:
            return False
    return True


class _MissingExtension(types.ModuleType):
    """Stands in for a compiled extension so that imports succeed; every call raises."""

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        qualified = f"{self.__name__}.{attribute}"

        def missing_kernel(*args, **kwargs):
            raise KernelRoutingError(
                f"{qualified} was called, but {self.__name__} is only kotomamba's stand-in for a CUDA "
                f"extension that is not installed: the reference routing (kotomamba.kernels."
                f"REFERENCE_ROUTING) missed the mamba-ssm code path that called it"
            )

        missing_kernel.__qualname__ = qualified
        return missing_kernel


def _install_reference_routing() -> None:
    for name in CUDA_EXTENSIONS:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _MissingExtension(name)
    for name in GPU_DSL_KERNEL_MODULES:
        sys.modules.setdefault(name, None)
    for module_name, attribute, replacement in REFERENCE_ROUTING:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            raise KernelRoutingError(
                f"{module_name} has no attribute {attribute!r}: this mamba-ssm version does not match "
                f"kotomamba.kernels.REFERENCE_ROUTING"
            )
        if replacement == NO_REFERENCE:
            function = _no_reference_stub(f"{module_name}.{attribute}")
        else:
            replacement_module, replacement_name = replacement.split(":")
            function = getattr(importlib.import_module(replacement_module), replacement_name)
        setattr(module, attribute, function)


def _install_scan_routing(deterministic: bool, min_channels: int | None = None) -> None:
    """kotomamba's scan under mamba-ssm's entry points; with ``min_channels`` only for calls of at least that
    many channels (mamba-ssm's own selective_scan_fn then stays: it calls the extension too)."""
    import dataclasses

    from kotomamba.ops import selective_scan

    if deterministic:
        selective_scan.DEFAULT_CONFIG = dataclasses.replace(selective_scan.DEFAULT_CONFIG, deterministic=True)
    interface = importlib.import_module(SCAN_EXTENSION_MODULE)
    extension = sys.modules.get("selective_scan_cuda")
    interface.selective_scan_cuda = selective_scan.SelectiveScanExtension(None if _is_stand_in(extension) else extension,
                                                                          min_channels)
    if min_channels is not None:
        return
    for module_name, attribute, replacement in SCAN_ROUTING:
        replacement_module, replacement_name = replacement.split(":")
        setattr(importlib.import_module(module_name), attribute,
                getattr(importlib.import_module(replacement_module), replacement_name))


def _install_document_routing() -> None:
    if _routed_originals:
        return
    for module_name, attribute, replacement in DOCUMENT_ROUTING:
        module = importlib.import_module(module_name)
        _routed_originals.setdefault(attribute, getattr(module, attribute))
        replacement_module, replacement_name = replacement.split(":")
        setattr(module, attribute, getattr(importlib.import_module(replacement_module), replacement_name))


def _no_reference_stub(qualified: str):
    def no_reference(*args, **kwargs):
        raise KernelRoutingError(
            f"{qualified} has no pure-PyTorch reference (mamba-ssm ships none), so it cannot run on "
            f"the reference kernel backend; it needs a GPU with mamba-ssm's kernels"
        )

    no_reference.__qualname__ = f"no_reference[{qualified}]"
    return no_reference


def _reject(function: str, **arguments) -> None:
    given = [name for name, value in arguments.items() if value is not None and value is not False]
    if given:
        raise KernelRoutingError(
            f"{function}: argument(s) {', '.join(given)} are not supported by the pure-PyTorch reference "
            f"kernel path; this needs mamba-ssm's CUDA kernels"
        )


# ----------------------------------------------------------------------------------------------
# Adapters: same signatures as the kernels they replace, bodies delegate to shipped references


def causal_conv1d_fn_reference(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                               final_states_out=None, activation=None):
    """causal_conv1d_fn's signature (its positional order differs from causal_conv1d_ref's)."""
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    return causal_conv1d_ref(x, weight, bias, initial_states=initial_states, return_final_states=return_final_states,
                             final_states_out=final_states_out, activation=activation, seq_idx=seq_idx)


def causal_conv1d_update_reference(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                                   conv_state_indices=None):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_update_ref

    _reject("causal_conv1d_update", conv_state_indices=conv_state_indices)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation=activation, cache_seqlens=cache_seqlens)


def mamba_inner_fn_reference(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                             out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                             C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None,
                             c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6):
    """mamba_inner_fn's signature; checkpoint_lvl only trades memory for recomputation, so it is ignored."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_ref

    _reject("mamba_inner_fn", b_rms_weight=b_rms_weight, c_rms_weight=c_rms_weight, dt_rms_weight=dt_rms_weight)

    def inner(xz_part: torch.Tensor) -> torch.Tensor:
        return mamba_inner_ref(xz_part, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                               out_proj_bias, A, B=B, C=C, D=D, delta_bias=delta_bias, B_proj_bias=B_proj_bias,
                               C_proj_bias=C_proj_bias, delta_softplus=delta_softplus)

    seq_idx = documents.active_document_index()
    return inner(xz) if seq_idx is None else _each_document(inner, xz, seq_idx, time_dim=2, out_time_dim=1)


def _each_document(function, inputs: torch.Tensor, seq_idx: torch.Tensor, time_dim: int, out_time_dim: int):
    """`function` of each packed document on its own (each starts from a zero state), joined back into
    the batch: the reference for --reset-state-at-eod, exact by construction."""
    rows = []
    for row, spans in enumerate(documents.document_spans(seq_idx)):
        row_inputs = inputs.narrow(0, row, 1)
        rows.append(torch.cat([function(row_inputs.narrow(time_dim, start, end - start)) for start, end in spans],
                              dim=out_time_dim))
    return torch.cat(rows, dim=0)


def selective_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                     state_batch_indices=None):
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    _reject("selective_state_update", state_batch_indices=state_batch_indices)
    return selective_state_update_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def layer_norm_fn_reference(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6,
                            dropout_p=0.0, rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                            return_dropout_mask=False):
    """layer_norm_fn (fused add + norm) via layer_norm_ref / rms_norm_ref.

    Matches the Triton kernel's dtypes: the norm is computed in fp32 and returned in x's dtype; the
    residual (pre-norm sum) is returned in residual's dtype, or fp32 with residual_in_fp32, else x's.
    """
    from mamba_ssm.ops.triton.layer_norm import layer_norm_ref, rms_norm_ref

    _reject("layer_norm_fn", return_dropout_mask=return_dropout_mask)
    if residual is not None:
        residual_dtype = residual.dtype
    else:
        residual_dtype = torch.float32 if residual_in_fp32 else x.dtype
    norm_ref = rms_norm_ref if is_rms_norm else layer_norm_ref
    *normalized, pre_norm_sum = norm_ref(x, weight, bias, residual=residual, x1=x1, weight1=weight1, bias1=bias1,
                                         eps=eps, dropout_p=dropout_p, rowscale=rowscale, prenorm=True, upcast=True)
    if prenorm:
        return (*normalized, pre_norm_sum.to(residual_dtype))
    return normalized[0] if len(normalized) == 1 else tuple(normalized)


def rms_norm_fn_reference(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                          rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False):
    return layer_norm_fn_reference(x, weight, bias, residual=residual, x1=x1, weight1=weight1, bias1=bias1, eps=eps,
                                   dropout_p=dropout_p, rowscale=rowscale, prenorm=prenorm,
                                   residual_in_fp32=residual_in_fp32, is_rms_norm=True,
                                   return_dropout_mask=return_dropout_mask)


def mamba_chunk_scan_combined_reference(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                        seq_idx=None, cu_seqlens=None, dt_softplus=False,
                                        dt_limit=(0.0, float("inf")), return_final_states=False,
                                        return_varlen_states=False):
    """mamba_chunk_scan_combined via mamba-ssm's ssd_minimal_discrete (the SSD paper's Listing 1).

    ssd_minimal_discrete is chunked like the kernel (memory ~ chunk_size^2, not seqlen x d_state per
    channel) and is the shipped reference that takes initial states and returns the final state,
    which the generation path needs. dt preprocessing, D, z and head groups are applied here as the
    kernel does.
    """
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    _reject("mamba_chunk_scan_combined", seq_idx=seq_idx, return_varlen_states=return_varlen_states)
    batch, seqlen, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    x_float = x.float()
    B_per_head = repeat(B.float(), "b l g n -> b l (g h) n", h=heads_per_group)
    C_per_head = repeat(C.float(), "b l g n -> b l (g h) n", h=heads_per_group)
    block_len = min(chunk_size, seqlen)
    # Zero-padded steps have dt = 0: no decay, no input, so the final state is unchanged.
    pad = (-seqlen) % block_len
    y, final_state = ssd_minimal_discrete(
        F.pad(x_float * dt.unsqueeze(-1), (0, 0, 0, 0, 0, pad)),
        F.pad(A.float() * dt, (0, 0, 0, pad)),
        F.pad(B_per_head, (0, 0, 0, 0, 0, pad)),
        F.pad(C_per_head, (0, 0, 0, 0, 0, pad)),
        block_len,
        initial_states=initial_states.float().unsqueeze(1) if initial_states is not None else None,
    )
    y = y[:, :seqlen]
    if D is not None:
        y = y + x_float * (D.float().unsqueeze(-1) if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, final_state) if return_final_states else y


def mamba_split_conv1d_scan_combined_reference(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                               initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                               return_final_states=False, activation="silu", rmsnorm_weight=None,
                                               rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                               ngroups=1, norm_before_gate=True):
    """mamba_split_conv1d_scan_combined composed of causal_conv1d_ref, the SSD reference and the gated rms_norm_ref.

    mamba-ssm's own mamba_split_conv1d_scan_ref is not used directly: it has no gated-MLP part
    (d_ssm < d_inner), normalizes over all groups at once (wrong for ngroups > 1), takes no
    initial/final states, and its scan materializes a (batch, dim, seqlen, d_state) tensor. With a
    document index (seq_idx, or kotomamba.documents'), each packed document runs on its own.
    """
    seq_idx = seq_idx if seq_idx is not None else documents.active_document_index()
    if seq_idx is not None:
        _reject("mamba_split_conv1d_scan_combined with packed documents", initial_states=initial_states,
                return_final_states=return_final_states)
        return _each_document(
            lambda part: _split_conv1d_scan_combined(
                part, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, None, dt_limit, False, activation,
                rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate),
            zxbcdt, seq_idx, time_dim=1, out_time_dim=1)
    return _split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states,
                                       dt_limit, return_final_states, activation, rmsnorm_weight, rmsnorm_eps,
                                       outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate)


def _split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states,
                                dt_limit, return_final_states, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight,
                                outproj_bias, headdim, ngroups, norm_before_gate):
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref as gated_rms_norm_ref

    if D.dim() == 1:
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation=activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y, final_states = mamba_chunk_scan_combined_reference(
        rearrange(x, "b l (h p) -> b l h p", h=nheads),
        dt,
        A,
        rearrange(B, "b l (g n) -> b l g n", g=ngroups),
        rearrange(C, "b l (g n) -> b l g n", g=ngroups),
        chunk_size,
        D=D,
        z=rearrange(z, "b l (h p) -> b l h p", h=nheads) if rmsnorm_weight is None else None,
        dt_bias=dt_bias,
        initial_states=initial_states,
        dt_softplus=True,
        dt_limit=dt_limit,
        return_final_states=True,
    )
    y = rearrange(y, "b l h p -> b l (h p)")
    if rmsnorm_weight is not None:
        y = gated_rms_norm_ref(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                               norm_before_gate=norm_before_gate)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final_states) if return_final_states else y


# ----------------------------------------------------------------------------------------------
# --reset-state-at-eod on the CUDA kernels: the active document index added to the calls mamba-ssm makes


def causal_conv1d_fwd_with_documents(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    """causal-conv1d's forward, given the packed documents' index: kotomamba's channel-first Triton
    convolution then (causal-conv1d takes an index only channel-last, and converting costs copies)."""
    seq_idx = seq_idx if seq_idx is not None else documents.active_document_index()
    if seq_idx is None:
        return _routed_originals["causal_conv1d_fwd_function"](x, weight, bias, None, initial_states, final_states_out,
                                                               silu_activation)
    _reject("causal_conv1d_fwd with packed documents", initial_states=initial_states, final_states_out=final_states_out)
    from kotomamba.ops.causal_conv1d import causal_conv1d_documents_fwd

    return causal_conv1d_documents_fwd(x, weight, bias, seq_idx, bool(silu_activation))


def causal_conv1d_bwd_with_documents(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                                     return_dinitial_states, silu_activation):
    seq_idx = seq_idx if seq_idx is not None else documents.active_document_index()
    if seq_idx is None:
        return _routed_originals["causal_conv1d_bwd_function"](x, weight, bias, dout, None, initial_states,
                                                               dfinal_states, dx, return_dinitial_states,
                                                               silu_activation)
    _reject("causal_conv1d_bwd with packed documents", initial_states=initial_states, dfinal_states=dfinal_states,
            return_dinitial_states=return_dinitial_states)
    from kotomamba.ops.causal_conv1d import causal_conv1d_documents_bwd

    dx, dweight, dbias = causal_conv1d_documents_bwd(x, weight, bias, dout, seq_idx, dx, bool(silu_activation))
    return dx, dweight, dbias, None


def mamba_split_conv1d_scan_combined_with_documents(*args, seq_idx=None, **kwargs):
    """Mamba-2's fused block, which takes seq_idx itself: given the active document index."""
    seq_idx = seq_idx if seq_idx is not None else documents.active_document_index()
    return _routed_originals["mamba_split_conv1d_scan_combined"](*args, seq_idx=seq_idx, **kwargs)


def flash_attn_with_kvcache_reference(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                      cache_seqlens=None, softmax_scale=None, causal=False, rotary_interleaved=False):
    """flash_attn_with_kvcache (the subset mha.py uses) with torch SDPA.

    Appends k/v to the cache in place at cache_seqlens, then attends with flash-attn's bottom-right
    causal alignment. mha.py's own no-flash-attn fallback passes is_causal=True to SDPA for a
    one-token query, which aligns top-left and attends only to the first cached token.
    """
    _reject("flash_attn_with_kvcache", rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    batch, query_len = q.shape[:2]
    if cache_seqlens is None:
        cache_seqlens = 0
    lengths = torch.as_tensor(cache_seqlens, device=q.device, dtype=torch.long).expand(batch)
    new_len = 0 if k is None else k.shape[1]
    if k is not None:
        for b in range(batch):
            start = int(lengths[b])
            k_cache[b, start:start + new_len] = k[b]
            v_cache[b, start:start + new_len] = v[b]
    total = lengths + new_len
    keys = k_cache[:, : int(total.max())]
    values = v_cache[:, : int(total.max())]
    head_repeat = q.shape[2] // keys.shape[2]
    keys = torch.repeat_interleave(keys, head_repeat, dim=2)
    values = torch.repeat_interleave(values, head_repeat, dim=2)
    key_position = torch.arange(keys.shape[1], device=q.device).view(1, 1, -1)
    allowed = key_position < total.view(-1, 1, 1)
    if causal:
        query_position = total.view(-1, 1, 1) - query_len + torch.arange(query_len, device=q.device).view(1, -1, 1)
        allowed = allowed & (key_position <= query_position)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=allowed.unsqueeze(1), scale=softmax_scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Triton cache


def configure_triton_cache(rank: int) -> None:
    """Give every rank its own TRITON_CACHE_DIR so that ranks don't race compiling into one cache.

    The per-rank directory is ``<base>/rank_<rank>`` with base the current TRITON_CACHE_DIR or
    ~/.triton/cache. A TRITON_CACHE_DIR that already ends in ``rank_<rank>`` (set per rank by the
    user, or by an earlier call) is left as it is.
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    per_rank_name = f"rank_{rank}"
    configured = os.environ.get("TRITON_CACHE_DIR")
    if configured and Path(configured).name == per_rank_name:
        return
    base = Path(configured) if configured else Path.home() / ".triton" / "cache"
    per_rank_dir = base / per_rank_name
    per_rank_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(per_rank_dir)
