"""Model FLOPs per token and model FLOPs utilization (MFU) for mamba-ssm language models.

Conventions (the same for every layer type):

* A matmul of an (m x k) by (k x n) matrix costs 2*m*n*k FLOPs (one multiply and one add per MAC);
  per token this is 2 * in_features * out_features for every ``nn.Linear``.
* Elementwise work (norms, activations, gating, residual adds, rotary, softmax, the D skip) and the
  embedding lookup are not counted: they are O(d) per token against O(d^2) for the projections.
* Backward costs 2x forward (input gradient + weight gradient matmuls), so a training step costs
  3x forward. Activation-checkpointing recomputation is NOT counted: this is model FLOPs (MFU),
  not hardware FLOPs (HFU), so MFU does not go up when recomputation is turned on.
* Causal attention and the causal part of Mamba-2's chunked scan count the half of the score
  matrix a causal kernel computes: an average of L/2 keys per query.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from kotomamba.errors import KotomambaError

# Selective scan (Mamba-1), per token, per (d_inner x d_state) state element, forward:
# dA = exp(delta * A) is 2 (mul + exp), dBx = (delta * x) * B is 1 (delta * x is shared over
# d_state), h = dA * h + dBx is 2, y += C * h is 2.
SELECTIVE_SCAN_FLOPS_PER_STATE_ELEMENT = 7

# GatedMLP and MHA round their hidden sizes up like mamba-ssm does.
_GATED_MLP_MULTIPLE_OF = 128
_MHA_MLP_DIM_MULTIPLE_OF = 256


class FlopsConfigError(KotomambaError, ValueError):
    """The model config cannot be counted (missing field or unknown layer); the message names it."""


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Rows of mamba-ssm's embedding: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
    return math.ceil(vocab_size / multiple) * multiple if multiple > 1 else vocab_size


def _mamba1_flops(d_model: int, cfg: Mapping) -> float:
    d_state = cfg.get("d_state", 16)
    d_conv = cfg.get("d_conv", 4)
    d_inner = int(cfg.get("expand", 2) * d_model)
    dt_rank = cfg.get("dt_rank", "auto")
    dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    in_proj = 2 * d_model * 2 * d_inner
    conv1d = 2 * d_conv * d_inner  # depthwise: one d_conv-tap filter per channel
    x_proj = 2 * d_inner * (dt_rank + 2 * d_state)
    dt_proj = 2 * dt_rank * d_inner
    scan = SELECTIVE_SCAN_FLOPS_PER_STATE_ELEMENT * d_inner * d_state
    out_proj = 2 * d_inner * d_model
    return in_proj + conv1d + x_proj + dt_proj + scan + out_proj


def _chunked_scan_flops(
    d_ssm: int, ngroups: int, d_state: int, chunk: int, seq_length: int, rank: int = 1
) -> float:
    """SSD (Mamba-2 / Mamba-3) per token, as mamba-ssm's Triton kernels compute it.

    With Q = min(chunk_size, seq_length): C·B^T over the whole Q x Q chunk block for every group
    (2*ngroups*d_state*Q); the masked (C·B^T)·X on the causal half (d_ssm*Q); chunk states
    B^T·X (2*d_ssm*d_state); C·state for the inter-chunk output (2*d_ssm*d_state); passing the
    state between chunks (2*d_ssm*d_state/Q). ``rank`` (Mamba-3 MIMO rank) multiplies the B/C
    widths, an estimate.
    """
    chunk = min(chunk, seq_length)
    state_width = d_state * rank
    chunk_scores = 2 * ngroups * state_width * chunk
    chunk_outputs = d_ssm * chunk
    states_and_outputs = 4 * d_ssm * state_width
    state_passing = 2 * d_ssm * state_width / chunk
    return chunk_scores + chunk_outputs + states_and_outputs + state_passing


def _mamba2_flops(d_model: int, cfg: Mapping, seq_length: int) -> float:
    d_state = cfg.get("d_state", 128)
    d_conv = cfg.get("d_conv", 4)
    d_inner = int(cfg.get("expand", 2) * d_model)
    d_ssm = cfg.get("d_ssm") or d_inner
    ngroups = cfg.get("ngroups", 1)
    nheads = d_ssm // cfg.get("headdim", 64)
    in_proj = 2 * d_model * (2 * d_inner + 2 * ngroups * d_state + nheads)
    conv1d = 2 * d_conv * (d_ssm + 2 * ngroups * d_state)
    scan = _chunked_scan_flops(d_ssm, ngroups, d_state, cfg.get("chunk_size", 256), seq_length)
    out_proj = 2 * d_inner * d_model
    return in_proj + conv1d + scan + out_proj


def _mamba3_flops(d_model: int, cfg: Mapping, seq_length: int) -> float:
    d_state = cfg.get("d_state", 128)
    d_inner = int(cfg.get("expand", 2) * d_model)
    ngroups = cfg.get("ngroups", 1)
    nheads = d_inner // cfg.get("headdim", 64)
    rank = cfg.get("mimo_rank", 4) if cfg.get("is_mimo", False) else 1
    rope_angles = int(d_state * cfg.get("rope_fraction", 0.5)) // 2
    in_proj = 2 * d_model * (2 * d_inner + 2 * d_state * ngroups * rank + 3 * nheads + rope_angles)
    scan = _chunked_scan_flops(d_inner, ngroups, d_state, cfg.get("chunk_size", 64), seq_length, rank)
    out_proj = 2 * d_inner * d_model
    return in_proj + scan + out_proj


def _attention_flops(d_model: int, cfg: Mapping, seq_length: int) -> float:
    if "num_heads" not in cfg:
        raise FlopsConfigError("attn_cfg needs 'num_heads' to count attention layers")
    num_heads = cfg["num_heads"]
    num_heads_kv = cfg.get("num_heads_kv") or num_heads
    head_dim = cfg.get("head_dim") or d_model // num_heads
    mlp_dim = math.ceil(cfg.get("mlp_dim", 0) / _MHA_MLP_DIM_MULTIPLE_OF) * _MHA_MLP_DIM_MULTIPLE_OF
    qkv_dim = head_dim * (num_heads + 2 * num_heads_kv)
    in_proj = 2 * d_model * (qkv_dim + mlp_dim)
    conv1d = 2 * cfg.get("d_conv", 0) * qkv_dim
    keys_per_query = seq_length / 2 if cfg.get("causal", False) else seq_length
    scores_and_values = 2 * 2 * head_dim * num_heads * keys_per_query  # Q·K^T and P·V
    out_proj = 2 * (head_dim * num_heads + mlp_dim // 2) * d_model
    return in_proj + conv1d + scores_and_values + out_proj


def _gated_mlp_flops(d_model: int, d_intermediate: int) -> float:
    hidden = math.ceil(d_intermediate / _GATED_MLP_MULTIPLE_OF) * _GATED_MLP_MULTIPLE_OF
    return 2 * d_model * 2 * hidden + 2 * hidden * d_model  # fc1 (value and gate), fc2


def flops_per_token(config, seq_length: int, include_backward: bool = True) -> float:
    """Model FLOPs per trained token of a mamba-ssm ``MambaConfig``-like ``config``.

    ``config`` needs ``d_model``, ``n_layer``, ``vocab_size`` and may have ``d_intermediate``
    (GatedMLP after every mixer when > 0), ``ssm_cfg`` (``layer`` Mamba1/Mamba2/Mamba3 and that
    module's arguments, mamba-ssm defaults otherwise), ``attn_layer_idx`` and ``attn_cfg`` (MHA
    arguments), ``pad_vocab_size_multiple``. Per layer it adds the mixer (Mamba-1: in_proj, conv1d,
    x_proj, dt_proj, selective scan, out_proj; Mamba-2/3: in_proj, conv1d, chunked SSD, out_proj;
    attention: projections plus Q·K^T and P·V) and the MLP, then the lm_head
    (2 * d_model * padded vocab). ``seq_length`` matters for attention and the SSD chunk terms.
    Returns forward FLOPs, times 3 when ``include_backward`` (backward = 2 x forward).
    """
    for field in ("d_model", "n_layer", "vocab_size"):
        if not hasattr(config, field):
            raise FlopsConfigError(f"model config {type(config).__name__} has no field {field!r}")
    if seq_length <= 0:
        raise FlopsConfigError(f"seq_length must be positive, got {seq_length}")
    d_model = config.d_model
    ssm_cfg = dict(getattr(config, "ssm_cfg", None) or {})
    ssm_layer = ssm_cfg.pop("layer", "Mamba1")
    attn_cfg = getattr(config, "attn_cfg", None) or {}
    attn_layers = set(getattr(config, "attn_layer_idx", None) or ())
    d_intermediate = getattr(config, "d_intermediate", 0) or 0

    if ssm_layer == "Mamba1":
        mixer = _mamba1_flops(d_model, ssm_cfg)
    elif ssm_layer == "Mamba2":
        mixer = _mamba2_flops(d_model, ssm_cfg, seq_length)
    elif ssm_layer == "Mamba3":
        mixer = _mamba3_flops(d_model, ssm_cfg, seq_length)
    else:
        raise FlopsConfigError(f"ssm_cfg layer {ssm_layer!r} is not one of Mamba1, Mamba2, Mamba3")
    attention = _attention_flops(d_model, attn_cfg, seq_length) if attn_layers else 0.0
    mlp = _gated_mlp_flops(d_model, d_intermediate) if d_intermediate > 0 else 0.0

    n_attention = sum(1 for index in range(config.n_layer) if index in attn_layers)
    n_ssm = config.n_layer - n_attention
    vocab = padded_vocab_size(config.vocab_size, getattr(config, "pad_vocab_size_multiple", 1))
    lm_head = 2 * d_model * vocab
    forward = n_ssm * mixer + n_attention * attention + config.n_layer * mlp + lm_head
    return 3.0 * forward if include_backward else float(forward)


# Dense (no sparsity) peak TFLOP/s by lower-case device-name substring, most specific first.
# Sources: NVIDIA data sheets (SXM parts unless named). "fp32" is the non-tensor-core rate,
# "tf32" the tensor-core rate used when TF32 matmuls are enabled.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("h100 nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("h100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),
    ("h200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),
    ("a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("a10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("v100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16, no tf32
    ("l40s", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("l4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("rtx 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
)


_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def peak_flops(device_name: str, dtype: str, override_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s of one ``device_name`` GPU for ``dtype``: bf16, fp16, tf32, fp32, or the
    torch names bfloat16, float16, float32 (a ``torch.dtype`` works too).

    ``override_tflops`` (``--peak-tflops``) wins. None for unknown devices (CPU included) and
    for a dtype the device has no tensor-core rate for (bf16 on V100): then no MFU is reported.
    """
    if override_tflops is not None:
        if override_tflops <= 0:
            raise FlopsConfigError(f"--peak-tflops must be positive, got {override_tflops}")
        return override_tflops * 1e12
    short_dtype = _DTYPE_ALIASES.get(str(dtype).removeprefix("torch."), str(dtype))
    if short_dtype not in ("bf16", "fp16", "tf32", "fp32"):
        raise FlopsConfigError(f"peak FLOPs dtype {dtype!r} is not one of bf16, fp16, tf32, fp32")
    lowered = device_name.lower()
    for name, peaks in PEAK_TFLOPS:
        if name in lowered:
            tflops = peaks.get(short_dtype)
            return None if tflops is None else tflops * 1e12
    return None


def mfu(tokens_per_second_per_gpu: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s per GPU over the GPU's peak FLOP/s."""
    if peak_flops <= 0:
        raise FlopsConfigError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_second_per_gpu * flops_per_token / peak_flops
