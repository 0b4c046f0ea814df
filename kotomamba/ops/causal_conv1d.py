"""Mamba's short causal convolution with packed documents kept apart, in the channel-first layout.

causal-conv1d takes a document index (``seq_idx``) only in its channel-last layout, and Mamba-1's block
(mamba-ssm's MambaInnerFn) works channel-first: converting there and back costs several copies of the
activations per layer, and the channel-last kernels are slower. These Triton kernels compute, for x and
dout of shape (batch, dim, seqlen) with the last dimension contiguous,

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W-1) + k])   over taps in t's document

(act: SiLU or none), and the backward (dx, dweight, dbias) of the same; taps before a document's first
position, or before the sequence, count as zero, exactly as causal-conv1d with seq_idx. Accumulation is
in fp32. dweight and dbias are summed per program and added up by torch in a fixed order.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kotomamba.errors import KotomambaError

BLOCK_D = 16
BLOCK_L = 128


@triton.jit
def _channel_bias(bias_ptr, d, mask_d, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    if HAS_BIAS:
        return tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    return tl.zeros((BLOCK_D,), tl.float32)


@triton.jit
def _tap_weight(w_ptr, stride_w_d, d, mask_d, k):
    """weight[d, k] as fp32 [BLOCK_D, 1]."""
    return tl.load(w_ptr + d * stride_w_d + k, mask=mask_d, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _tap_input(x_rows, seq_row, here, t, k, seqlen, mask_d, WIDTH: tl.constexpr):
    """What tap k reads for outputs at t, fp32: x[t - (W-1) + k], zero outside t's document (seq_idx `here`)."""
    source = t - (WIDTH - 1) + k
    inside = (source >= 0) & (source < seqlen)
    same = inside & (tl.load(seq_row + source, mask=inside, other=-2) == here)
    return tl.load(x_rows + source[None, :], mask=mask_d[:, None] & same[None, :], other=0.0).to(tl.float32)


@triton.jit
def _preactivation(x_rows, seq_row, bias, w_ptr, stride_w_d, d, mask_d, t, seqlen, WIDTH: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """bias + the taps of t's document, fp32 [BLOCK_D, BLOCK_L], and seq_idx at t."""
    here = tl.load(seq_row + t, mask=t < seqlen, other=-1)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32) + bias[:, None]
    for k in tl.static_range(WIDTH):
        acc += _tap_weight(w_ptr, stride_w_d, d, mask_d, k) * _tap_input(x_rows, seq_row, here, t, k, seqlen, mask_d,
                                                                          WIDTH)
    return acc, here


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, out_ptr, dim, seqlen,
                     stride_x_b, stride_x_d, stride_w_d, stride_seq_b, stride_out_b, stride_out_d,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2)
    mask_d = d < dim
    bias = _channel_bias(bias_ptr, d, mask_d, HAS_BIAS, BLOCK_D)
    x_rows = x_ptr + b * stride_x_b + d[:, None] * stride_x_d
    pre, _ = _preactivation(x_rows, seq_ptr + b * stride_seq_b, bias, w_ptr, stride_w_d, d, mask_d, t, seqlen, WIDTH,
                            BLOCK_D, BLOCK_L)
    out = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(out_ptr + b * stride_out_b + d[:, None] * stride_out_d + t[None, :], out,
             mask=mask_d[:, None] & (t < seqlen)[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dim, seqlen,
                     stride_x_b, stride_x_d, stride_w_d, stride_seq_b, stride_dout_b, stride_dout_d,
                     stride_dx_b, stride_dx_d,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx at this tile's positions t, from the gradients of the pre-activations at t .. t + W-1 (each
    recomputed); dweight and dbias from the pre-activation gradients at t, as this program's partial sums."""
    pid_l = tl.program_id(0)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2)
    mask_d = d < dim
    bias = _channel_bias(bias_ptr, d, mask_d, HAS_BIAS, BLOCK_D)
    x_rows = x_ptr + b * stride_x_b + d[:, None] * stride_x_d
    dout_rows = dout_ptr + b * stride_dout_b + d[:, None] * stride_dout_d
    seq_row = seq_ptr + b * stride_seq_b
    here = tl.load(seq_row + t, mask=t < seqlen, other=-1)
    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    part_row = b * tl.num_programs(0) + pid_l  # programs along d write disjoint channels of one row
    for j in tl.static_range(WIDTH):
        # the output at t + j reads x[t] through tap k = W-1-j
        target = t + j
        pre, target_doc = _preactivation(x_rows, seq_row, bias, w_ptr, stride_w_d, d, mask_d, target, seqlen, WIDTH,
                                         BLOCK_D, BLOCK_L)
        valid = mask_d[:, None] & ((target < seqlen) & (target_doc == here))[None, :]
        dpre = tl.load(dout_rows + target[None, :], mask=valid, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        dpre = tl.where(valid, dpre, 0.0)
        dx += _tap_weight(w_ptr, stride_w_d, d, mask_d, WIDTH - 1 - j) * dpre
        if j == 0:  # this tile's own outputs: their taps' weights and the bias
            for tap in tl.static_range(WIDTH):
                x = _tap_input(x_rows, seq_row, here, t, tap, seqlen, mask_d, WIDTH)
                tl.store(dw_part_ptr + (part_row * dim + d) * WIDTH + tap, tl.sum(dpre * x, axis=1), mask=mask_d)
            if HAS_BIAS:
                tl.store(dbias_part_ptr + part_row * dim + d, tl.sum(dpre, axis=1), mask=mask_d)
    tl.store(dx_ptr + b * stride_dx_b + d[:, None] * stride_dx_d + t[None, :], dx,
             mask=mask_d[:, None] & (t < seqlen)[None, :])


class CausalConv1dInputError(KotomambaError, ValueError):
    """The inputs are outside what this kernel computes (shape or layout)."""


def _check(x: torch.Tensor, weight: torch.Tensor, seq_idx: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(-1) != 1:
        raise CausalConv1dInputError(f"causal_conv1d: x must be (batch, dim, seqlen) with seqlen contiguous, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] > 4:
        raise CausalConv1dInputError(f"causal_conv1d: weight must be (dim={x.shape[1]}, width <= 4), got {tuple(weight.shape)}")
    if tuple(seq_idx.shape) != (x.shape[0], x.shape[2]):
        raise CausalConv1dInputError(f"causal_conv1d: seq_idx must be (batch, seqlen) = {(x.shape[0], x.shape[2])}, got "
                         f"{tuple(seq_idx.shape)}")


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    batch, dim, seqlen = x.shape
    return triton.cdiv(seqlen, BLOCK_L), triton.cdiv(dim, BLOCK_D), batch


def causal_conv1d_documents_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                seq_idx: torch.Tensor, silu: bool) -> torch.Tensor:
    """The convolution of channel-first `x` with taps only inside each position's document; out like x."""
    _check(x, weight, seq_idx)
    seq_idx = seq_idx.to(torch.int32).contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _conv_fwd_kernel[_grid(x)](
            x, weight, bias, seq_idx, out, x.shape[1], x.shape[2], x.stride(0), x.stride(1), weight.stride(0),
            seq_idx.stride(0), out.stride(0), out.stride(1), WIDTH=weight.shape[1], HAS_BIAS=bias is not None,
            SILU=silu, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    return out


def causal_conv1d_documents_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                dout: torch.Tensor, seq_idx: torch.Tensor, dx: torch.Tensor | None, silu: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) of `causal_conv1d_documents_fwd`; dx is written into `dx` when given (any
    strides with seqlen contiguous)."""
    _check(x, weight, seq_idx)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    seq_idx = seq_idx.to(torch.int32).contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if dx is None else dx
    grid = _grid(x)
    # one row of partial sums per (batch row, block of positions), written whole by the programs along d
    part_rows = grid[0] * grid[2]
    dw_part = torch.empty(part_rows, x.shape[1], weight.shape[1], device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(part_rows, x.shape[1], device=x.device, dtype=torch.float32) if bias is not None else None
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _conv_bwd_kernel[grid](
            x, weight, bias, seq_idx, dout, dx, dw_part, dbias_part, x.shape[1], x.shape[2], x.stride(0), x.stride(1),
            weight.stride(0), seq_idx.stride(0), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
            WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    dweight = dw_part.sum(dim=0).to(weight.dtype)
    dbias = dbias_part.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
