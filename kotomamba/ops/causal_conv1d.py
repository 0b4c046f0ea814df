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

# Tiles of channels x positions. The backward holds 7 shifted tiles of x and their document ids: at 64
# positions and 8 warps it needs ~104 registers (sm_90, compiled), at 128 positions and 4 warps it spilled.
BLOCK_D = 16
BLOCK_L = 128
BACKWARD_BLOCK_L = 64
WARPS = 8


@triton.jit
def _channel_bias(bias_ptr, d, mask_d, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    if HAS_BIAS:
        return tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    return tl.zeros((BLOCK_D,), tl.float32)


@triton.jit
def _tap_weight(w_ptr, stride_w_d, d, mask_d, slot: tl.constexpr, WIDTH: tl.constexpr):
    """The weight of tap slot 0-3 as fp32 [BLOCK_D, 1]: slot j reads x[t - 3 + j]; a width below 4 takes the
    last slots (tap k is slot k + 4 - W) and the first are zero."""
    if slot < 4 - WIDTH:
        return tl.zeros((d.shape[0], 1), dtype=tl.float32)
    return tl.load(w_ptr + d * stride_w_d + (slot - (4 - WIDTH)), mask=mask_d, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _tap_weights(w_ptr, stride_w_d, d, mask_d, WIDTH: tl.constexpr):
    return (_tap_weight(w_ptr, stride_w_d, d, mask_d, 0, WIDTH), _tap_weight(w_ptr, stride_w_d, d, mask_d, 1, WIDTH),
            _tap_weight(w_ptr, stride_w_d, d, mask_d, 2, WIDTH), _tap_weight(w_ptr, stride_w_d, d, mask_d, 3, WIDTH))


@triton.jit
def _shifted(x_rows, seq_row, t, shift: tl.constexpr, seqlen, mask_d):
    """x[t + shift] as fp32 [BLOCK_D, BLOCK_L] (zero outside the sequence) and seq_idx[t + shift] (-1 there)."""
    source = t + shift
    inside = (source >= 0) & (source < seqlen)
    document = tl.load(seq_row + source, mask=inside, other=-1)
    return tl.load(x_rows + source[None, :], mask=mask_d[:, None] & inside[None, :], other=0.0).to(tl.float32), document


@triton.jit
def _tap(weight, x, x_document, target_document):
    # a tap counts only inside its target's document (positions outside the sequence are document -1)
    return weight * tl.where((x_document == target_document)[None, :], x, 0.0)


@triton.jit
def _preactivation(bias, w0, w1, w2, w3, x0, s0, x1, s1, x2, s2, x3, s3):
    """bias + the 4 tap slots of targets whose inputs are x0..x3 (oldest first); the target is at x3's position."""
    return (bias[:, None] + _tap(w0, x0, s0, s3) + _tap(w1, x1, s1, s3) + _tap(w2, x2, s2, s3)
            + _tap(w3, x3, s3, s3))


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
    seq_row = seq_ptr + b * stride_seq_b
    xm3, sm3 = _shifted(x_rows, seq_row, t, -3, seqlen, mask_d)
    xm2, sm2 = _shifted(x_rows, seq_row, t, -2, seqlen, mask_d)
    xm1, sm1 = _shifted(x_rows, seq_row, t, -1, seqlen, mask_d)
    x0, s0 = _shifted(x_rows, seq_row, t, 0, seqlen, mask_d)
    w0, w1, w2, w3 = _tap_weights(w_ptr, stride_w_d, d, mask_d, WIDTH)
    pre = _preactivation(bias, w0, w1, w2, w3, xm3, sm3, xm2, sm2, xm1, sm1, x0, s0)
    out = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(out_ptr + b * stride_out_b + d[:, None] * stride_out_d + t[None, :], out,
             mask=mask_d[:, None] & (t < seqlen)[None, :])


@triton.jit
def _output_gradient(dout_rows, t, j: tl.constexpr, seqlen, mask_d, pre, target_document, here, SILU: tl.constexpr):
    """d(loss)/d(pre-activation) at t + j, zero where t + j is past the sequence or in another document than t."""
    valid = mask_d[:, None] & ((t + j < seqlen) & (target_document == here))[None, :]
    dpre = tl.load(dout_rows + (t + j)[None, :], mask=valid, other=0.0).to(tl.float32)
    if SILU:
        sig = tl.sigmoid(pre)
        dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
    return tl.where(valid, dpre, 0.0)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, dout_ptr, dx_ptr, dw_part_ptr, dbias_part_ptr, dim, seqlen,
                     stride_x_b, stride_x_d, stride_w_d, stride_seq_b, stride_dout_b, stride_dout_d,
                     stride_dx_b, stride_dx_d,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx at this tile's positions t, from the gradients of the pre-activations at t .. t + 3 (each
    recomputed from x at t - 3 .. t + 3, loaded once); dweight and dbias from the pre-activation gradients
    at t, as this program's partial sums."""
    pid_l = tl.program_id(0)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2)
    mask_d = d < dim
    bias = _channel_bias(bias_ptr, d, mask_d, HAS_BIAS, BLOCK_D)
    x_rows = x_ptr + b * stride_x_b + d[:, None] * stride_x_d
    dout_rows = dout_ptr + b * stride_dout_b + d[:, None] * stride_dout_d
    seq_row = seq_ptr + b * stride_seq_b
    xm3, sm3 = _shifted(x_rows, seq_row, t, -3, seqlen, mask_d)
    xm2, sm2 = _shifted(x_rows, seq_row, t, -2, seqlen, mask_d)
    xm1, sm1 = _shifted(x_rows, seq_row, t, -1, seqlen, mask_d)
    x0, s0 = _shifted(x_rows, seq_row, t, 0, seqlen, mask_d)
    xp1, sp1 = _shifted(x_rows, seq_row, t, 1, seqlen, mask_d)
    xp2, sp2 = _shifted(x_rows, seq_row, t, 2, seqlen, mask_d)
    xp3, sp3 = _shifted(x_rows, seq_row, t, 3, seqlen, mask_d)
    w0, w1, w2, w3 = _tap_weights(w_ptr, stride_w_d, d, mask_d, WIDTH)
    # the output at t + j reads x[t] through slot 3 - j
    g0 = _output_gradient(dout_rows, t, 0, seqlen, mask_d,
                          _preactivation(bias, w0, w1, w2, w3, xm3, sm3, xm2, sm2, xm1, sm1, x0, s0), s0, s0, SILU)
    g1 = _output_gradient(dout_rows, t, 1, seqlen, mask_d,
                          _preactivation(bias, w0, w1, w2, w3, xm2, sm2, xm1, sm1, x0, s0, xp1, sp1), sp1, s0, SILU)
    g2 = _output_gradient(dout_rows, t, 2, seqlen, mask_d,
                          _preactivation(bias, w0, w1, w2, w3, xm1, sm1, x0, s0, xp1, sp1, xp2, sp2), sp2, s0, SILU)
    g3 = _output_gradient(dout_rows, t, 3, seqlen, mask_d,
                          _preactivation(bias, w0, w1, w2, w3, x0, s0, xp1, sp1, xp2, sp2, xp3, sp3), sp3, s0, SILU)
    dx = w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3
    tl.store(dx_ptr + b * stride_dx_b + d[:, None] * stride_dx_d + t[None, :], dx,
             mask=mask_d[:, None] & (t < seqlen)[None, :])
    # this tile's own outputs (g0): their taps' weights and the bias
    part_row = b * tl.num_programs(0) + pid_l  # programs along d write disjoint channels of one row
    dw_row = dw_part_ptr + (part_row * dim + d) * WIDTH
    for tap in tl.static_range(WIDTH):  # tap k reads slot k + 4 - W (no constexpr is reassigned in the loop)
        if tap + 4 - WIDTH == 0:
            source, source_document = xm3, sm3
        elif tap + 4 - WIDTH == 1:
            source, source_document = xm2, sm2
        elif tap + 4 - WIDTH == 2:
            source, source_document = xm1, sm1
        else:
            source, source_document = x0, s0
        tl.store(dw_row + tap, tl.sum(_tap(g0, source, source_document, s0), axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part_row * dim + d, tl.sum(g0, axis=1), mask=mask_d)


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


def _grid(x: torch.Tensor, block_l: int) -> tuple[int, int, int]:
    batch, dim, seqlen = x.shape
    return triton.cdiv(seqlen, block_l), triton.cdiv(dim, BLOCK_D), batch


def causal_conv1d_documents_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                seq_idx: torch.Tensor, silu: bool) -> torch.Tensor:
    """The convolution of channel-first `x` with taps only inside each position's document; out like x."""
    _check(x, weight, seq_idx)
    seq_idx = seq_idx.to(torch.int32).contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _conv_fwd_kernel[_grid(x, BLOCK_L)](
            x, weight, bias, seq_idx, out, x.shape[1], x.shape[2], x.stride(0), x.stride(1), weight.stride(0),
            seq_idx.stride(0), out.stride(0), out.stride(1), WIDTH=weight.shape[1], HAS_BIAS=bias is not None,
            SILU=silu, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, num_warps=WARPS)
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
    grid = _grid(x, BACKWARD_BLOCK_L)
    # one row of partial sums per (batch row, block of positions), written whole by the programs along d
    part_rows = grid[0] * grid[2]
    dw_part = torch.empty(part_rows, x.shape[1], weight.shape[1], device=x.device, dtype=torch.float32)
    dbias_part = torch.empty(part_rows, x.shape[1], device=x.device, dtype=torch.float32) if bias is not None else None
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _conv_bwd_kernel[grid](
            x, weight, bias, seq_idx, dout, dx, dw_part, dbias_part, x.shape[1], x.shape[2], x.stride(0), x.stride(1),
            weight.stride(0), seq_idx.stride(0), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
            WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=BLOCK_D, BLOCK_L=BACKWARD_BLOCK_L,
            num_warps=WARPS)
    dweight = dw_part.sum(dim=0).to(weight.dtype)
    dbias = dbias_part.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
