"""Mamba-1's selective scan in Triton: forward and backward (deterministic on request).

Computes exactly what ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` computes for a
real ``A`` and input-dependent ``B``/``C`` (Mamba-1's case), per channel ``d`` and state ``n``::

    dt_t   = softplus(delta_t + delta_bias)            (each optional)
    h_t    = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
    y_t    = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t  = y_t * silu(z_t)                            (z optional)

How the work is laid out, and why:
- A channel's 16 states are held by 4 threads, 4 states each, in registers; each thread walks the
  sequence one step at a time. A step is then a few instructions per state (one exponential, the
  state's multiply-add, the output's) and a 2-shuffle sum over the channel's 4 threads, with no scan
  between threads: a parallel scan along time spends most of its instructions on combining. Every
  tensor is [channels, 16] in one layout: 4 consecutive columns per thread, 4 threads per channel,
  8 channels per warp. As states, the columns are the 16 states; as a "step tile", each group of 4
  columns holds the channel's next 4 steps (one 8-byte load per thread), so picking a step's value
  is picking a register. B and C go to the kernels as one fp32 (batch x group, steps, 32) table: a
  step's B and C are two 16-byte loads per thread, at one address for all channels of a warp.
- The forward keeps nothing for the backward but the state at the end of each part (below; one part: the
  final state, as mamba-ssm keeps one per 2,048 steps).
- The backward recomputes states instead of storing them: a first pass saves the state at the
  start of every ``segment`` steps; then, segment by segment from the last, it saves the state at
  the start of every 4 steps, and tile by tile from the last it recomputes the tile's 4 states and
  runs the adjoint recurrence backwards through them::

      G_t = C_t * dy_t + exp(dt_{t+1} A) * G_{t+1}          (dL/dh_t)

- dB and dC sum over every channel of a group: each step's 32 values are added over the program's
  channels by shuffles, then either added into one fp32 sum with atomic adds (the default: fast and
  small, but float addition in no fixed order) or, with ``ScanConfig(deterministic=True)``, written
  to the program's own partial-sum rows that one ``torch.sum`` adds in a fixed order: a bitwise
  repeatable backward (mamba-ssm's accumulates dB/dC/dA with atomic adds and is not). A program is one
  warp by default: across warps, every step's sum would wait at a barrier.
- A program walks its steps one at a time, so its time is the sequence's length whatever the GPU's load:
  a small batch leaves warp slots empty, and any batch can end on a partial wave of programs. The
  sequence can be split into parts run side by side (``ScanConfig.forward_parts``/``backward_parts``;
  by default as many as a model of the GPU's warp slots says pay). The recurrence is linear, so a part
  run from a zero state gives its end state up to its start state times the part's decay
  ``exp(A sum dt)``: the forward runs its parts from zero, carries the states across parts (a short
  sequential pass over parts), and runs them again from their true starts. It saves the state at the
  end of each backward part (as mamba-ssm's CUDA kernel saves one per chunk of 2048), so the backward
  needs only the adjoint carried in from the parts after it: a light pass runs the adjoint recurrence
  backwards through each part from zero (it needs no state), and the same carry adds them up.
- When ``z`` is given, the pre-gate output is not stored (mamba-ssm's interface keeps it only for
  its own backward); the backward recomputes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types

import torch
import triton
import triton.language as tl

from kotomamba.documents import active_document_index
from kotomamba.errors import KotomambaError

LOG2_E = tl.constexpr(1.4426950408889634)  # a constexpr: kernels may read no other global
LN_2 = tl.constexpr(0.6931471805599453)
TILE = tl.constexpr(4)  # steps per tile, and states per thread
ROW = tl.constexpr(32)  # one step's row of the B/C table: B's 16 states, then C's
STATES = tl.constexpr(16)  # states a channel's threads hold (d_state up to this)
MAX_STATES = STATES.value
TILE_STEPS = TILE.value
ROW_WIDTH = ROW.value


class SelectiveScanInputError(KotomambaError, ValueError):
    """The inputs are outside what this kernel computes (shape, dtype, layout or device)."""


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _log2(x, FAST_MATH: tl.constexpr):
    # On a GPU the special-function unit's log2 (error ~2^-22), where tl.log2 is a ~20-instruction
    # polynomial; Triton's interpreter runs no PTX, so on a CPU it is tl.log2.
    if FAST_MATH:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _sigmoid(x, FAST_MATH: tl.constexpr):
    denominator = 1.0 + tl.exp2(-x * LOG2_E)
    if FAST_MATH:  # the special-function unit's reciprocal (1 ulp) instead of a division
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [denominator], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / denominator


@triton.jit
def _softplus(x, FAST_MATH: tl.constexpr):
    # torch.nn.functional.softplus (threshold 20); the series keeps e = e^-|x| where 1 + e rounds
    e = tl.exp2(-tl.abs(x) * LOG2_E)
    log1p_e = tl.where(e < 1e-2, e * (1.0 - e * (0.5 - e * (0.3333333333 - 0.25 * e))),
                       _log2(1.0 + e, FAST_MATH) * LN_2)
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _at(tile, j: tl.constexpr, BLOCK_D: tl.constexpr):
    """Step j of a [channels, 16] step tile, in all 16 columns. A step tile holds a channel's 4 steps in
    each group of 4 columns, the 4 columns one thread holds, so this only picks a register (an OR of
    the bits with zeros folds away, where a float sum with zeros would not)."""
    groups = tl.reshape(tile, (BLOCK_D, 4, TILE)).to(tl.int32, bitcast=True)
    picked = tl.reduce(tl.where(tl.arange(0, TILE)[None, None, :] == j, groups, 0), 2, _bit_or)
    picked = picked.to(tl.float32, bitcast=True)
    return tl.reshape(tl.broadcast_to(picked[:, :, None], (BLOCK_D, 4, TILE)), (BLOCK_D, STATES))


@triton.jit
def _step_dt(delta_rows, t, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_MATH: tl.constexpr):
    """dt and the raw delta (+ bias) that softplus saw, as step tiles; dt is 0 where masked, which keeps the state."""
    raw = tl.load(delta_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    dt = _softplus(raw, FAST_MATH) if SOFTPLUS else raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _step_inputs(u_rows, delta_rows, t, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 FAST_MATH: tl.constexpr):
    """u, dt and the raw delta (+ bias), as step tiles (see _step_dt)."""
    u = tl.load(u_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
    dt, raw = _step_dt(delta_rows, t, mask, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
    return u, dt, raw


@triton.jit
def _gated_dout(dout_rows, z_rows, t, mask, HAS_Z: tl.constexpr, FAST_MATH: tl.constexpr):
    """dout, z, sigmoid(z) and dL/dy through the gate (dout * z * sigmoid(z)), as step tiles; without z all
    four are dout."""
    dout = tl.load(dout_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_rows + t[None, :], mask=mask, other=0.0).to(tl.float32)
        z_sigmoid = _sigmoid(z, FAST_MATH)
        return dout, z, z_sigmoid, dout * z * z_sigmoid
    return dout, dout, dout, dout


@triton.jit
def _part_cells(b, dim, d, n_parts, part, n):
    """Offsets of [b, d, part, :] in a (batch, dim, parts, 16) tensor, as [channels, 16]."""
    return ((b * dim + d[:, None]) * n_parts + part) * STATES + n[None, :]


@triton.jit
def _document_keep(seq_rows, t, mask):
    """A step tile of 1, and 0 where seq_idx changes (a step that starts another document: the state it
    inherits is dropped). Step 0 inherits nothing anyway."""
    here = tl.load(seq_rows + t[None, :], mask=mask, other=0)
    before = tl.load(seq_rows + t[None, :] - 1, mask=mask & (t > 0)[None, :], other=0)
    return tl.where(here == before, 1.0, 0.0)


@triton.jit
def _decay(dt, keep, j: tl.constexpr, a2, BLOCK_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    """exp(dt A) of step j of a tile (0 where the step starts another document)."""
    decay = tl.exp2(_at(dt, j, BLOCK_D) * a2)
    if HAS_SEQ_IDX:
        decay = decay * _at(keep, j, BLOCK_D)
    return decay


@triton.jit
def _state_after(h, j: tl.constexpr, a2, dt, dtu, keep, rows, BLOCK_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    """The state after step j of a tile, from the state before it."""
    return _decay(dt, keep, j, a2, BLOCK_D, HAS_SEQ_IDX) * h + _at(dtu, j, BLOCK_D) * tl.load(rows + j * ROW)


@triton.jit
def _advance_tile(h, a2, dt, dtu, keep, rows, BLOCK_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    # the state after a tile's 4 steps
    for j in tl.static_range(TILE):
        h = _state_after(h, j, a2, dt, dtu, keep, rows, BLOCK_D, HAS_SEQ_IDX)
    return h


@triton.jit
def _program_rows(pid_d, pid_bg, n_groups, dim_per_group, BLOCK_D: tl.constexpr):
    b = pid_bg // n_groups
    g = pid_bg % n_groups
    local_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, local_d, local_d < dim_per_group, g * dim_per_group + local_d


@triton.jit
def _channel_parameters(A_ptr, D_ptr, bias_ptr, d, mask_d, mask_n, n, stride_A_d, stride_A_n,
                        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A x log2(e) as [channels, 16] (exp(dt A) is then one exp2; states past d_state are 0 and stay 0),
    D and delta_bias as [channels, 1] (zeros where not given)."""
    a2 = tl.load(A_ptr + d[:, None] * stride_A_d + n[None, :] * stride_A_n, mask=mask_n, other=0.0) * LOG2_E
    none = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    D = tl.load(D_ptr + d, mask=mask_d, other=0.0)[:, None] if HAS_D else none
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0)[:, None] if HAS_BIAS else none
    return a2, D, bias


@triton.jit
def _part_decay(a2, dt_sum, keep_all, BLOCK_D: tl.constexpr):
    """exp(A sum(dt)) over a part, the product of its steps' decays: as [channels, 16]. dt_sum and keep_all are
    step tiles summed / multiplied over the part's tiles; each channel's 4 threads hold the same 4 columns."""
    total_dt = tl.sum(dt_sum, axis=1)[:, None] * (1.0 / STATES * TILE)
    return tl.exp2(a2 * total_dt) * tl.min(keep_all, axis=1)[:, None]


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, BC_ptr, D_ptr, z_ptr, bias_ptr, seq_idx_ptr, out_ptr, out_z_ptr,
    saved_ptr, start_ptr, local_ptr, decay_ptr,
    dim_per_group, n_groups, seqlen, dstate, padded_len, part_len, saved_len, n_saved,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_A_d, stride_A_n,
    stride_z_b, stride_z_d, stride_seq_idx_b, stride_out_b, stride_out_d, stride_out_z_b, stride_out_z_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, STORE_OUT: tl.constexpr, LOCAL: tl.constexpr, HAS_START: tl.constexpr,
    BLOCK_D: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """One part of the sequence (program_id 2) of BLOCK_D channels. LOCAL: from a zero state, only the part's
    end state and decay (exp(A sum dt)) into local_ptr / decay_ptr, (batch, dim, parts, 16). Otherwise from
    the part's start state (start_ptr, or zero) the outputs, and the state at the end of every saved_len
    steps into saved_ptr, (batch, dim, n_saved, d_state)."""
    pid_bg = tl.program_id(1)
    part = tl.program_id(2)
    n_parts = tl.num_programs(2)
    b, local_d, mask_d, d = _program_rows(tl.program_id(0), pid_bg, n_groups, dim_per_group, BLOCK_D)
    dim = dim_per_group * n_groups
    n = tl.arange(0, STATES)
    step = n % TILE  # the step a column of a step tile holds
    once = (n < TILE)[None, :]  # one copy of each step, for stores
    mask_n = mask_d[:, None] & (n < dstate)[None, :]
    a2, D, bias = _channel_parameters(A_ptr, D_ptr, bias_ptr, d, mask_d, mask_n, n, stride_A_d, stride_A_n, HAS_D,
                                      HAS_BIAS, BLOCK_D)
    u_rows = u_ptr + b * stride_u_b + d[:, None] * stride_u_d
    delta_rows = delta_ptr + b * stride_delta_b + d[:, None] * stride_delta_d
    bc_rows = BC_ptr + pid_bg * padded_len * ROW + n[None, :] + 0 * local_d[:, None]
    seq_rows = seq_idx_ptr + b * stride_seq_idx_b + 0 * local_d[:, None] if HAS_SEQ_IDX else u_rows
    part_cells = _part_cells(b, dim, d, n_parts, part, n)
    if HAS_START:
        h = tl.load(start_ptr + part_cells, mask=mask_d[:, None], other=0.0)
    else:
        h = tl.zeros((BLOCK_D, STATES), dtype=tl.float32)
    dt_sum = tl.zeros((BLOCK_D, STATES), dtype=tl.float32)
    keep_all = tl.full((BLOCK_D, STATES), 1.0, dtype=tl.float32)
    part_start = part * part_len
    part_end = tl.minimum(part_start + part_len, seqlen)
    for t0 in range(part_start, part_end, TILE):
        t = t0 + step
        mask = mask_d[:, None] & (t < seqlen)[None, :]
        u, dt, _ = _step_inputs(u_rows, delta_rows, t, mask, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
        keep = _document_keep(seq_rows, t, mask) if HAS_SEQ_IDX else dt
        if LOCAL:
            h = _advance_tile(h, a2, dt, dt * u, keep, bc_rows + t0 * ROW, BLOCK_D, HAS_SEQ_IDX)
            dt_sum += dt
            if HAS_SEQ_IDX:
                keep_all *= keep
        else:
            dtu = dt * u
            rows = bc_rows + t0 * ROW
            y = tl.zeros((BLOCK_D, STATES), dtype=tl.float32)
            for j in tl.static_range(TILE):
                h = _state_after(h, j, a2, dt, dtu, keep, rows, BLOCK_D, HAS_SEQ_IDX)
                y = tl.where(step[None, :] == j, tl.sum(h * tl.load(rows + (j * ROW + STATES)), axis=1)[:, None], y)
            if HAS_D:
                y += u * D
            if STORE_OUT:
                tl.store(out_ptr + b * stride_out_b + d[:, None] * stride_out_d + t[None, :], y, mask=mask & once)
            if HAS_Z:
                z = tl.load(z_ptr + b * stride_z_b + d[:, None] * stride_z_d + t[None, :], mask=mask & once,
                            other=0.0).to(tl.float32)
                tl.store(out_z_ptr + b * stride_out_z_b + d[:, None] * stride_out_z_d + t[None, :],
                         y * z * _sigmoid(z, FAST_MATH), mask=mask & once)
            # the state at the end of each of the backward's parts (saved_len divides part_len)
            end = t0 + TILE
            if (end % saved_len == 0) | (end >= part_end):
                saved = (end - 1) // saved_len
                tl.store(saved_ptr + ((b * dim + d[:, None]) * n_saved + saved) * dstate + n[None, :], h, mask=mask_n)
    if LOCAL:
        tl.store(local_ptr + part_cells, h, mask=mask_d[:, None])
        tl.store(decay_ptr + part_cells, _part_decay(a2, dt_sum, keep_all, BLOCK_D), mask=mask_d[:, None])


@triton.jit
def _carry_kernel(local_ptr, decay_ptr, carry_ptr, n_cells, n_parts, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """The state each part starts from, given each part's own end state from zero (local) and its decay:
    carry_0 = 0, carry_{p+1} = local_p + decay_p * carry_p; REVERSE walks the parts from the last (the
    adjoint's carry into each part from the parts after it). Tensors (cells, parts, 16), cells = batch x dim."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_cells * STATES
    base = (e // STATES) * n_parts * STATES + e % STATES
    carry = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, n_parts):
        p = n_parts - 1 - k if REVERSE else k
        tl.store(carry_ptr + base + p * STATES, carry, mask=mask)
        carry = (tl.load(local_ptr + base + p * STATES, mask=mask, other=0.0)
                 + tl.load(decay_ptr + base + p * STATES, mask=mask, other=0.0) * carry)


@triton.jit
def _adjoint_carry_kernel(
    delta_ptr, A_ptr, BC_ptr, z_ptr, bias_ptr, seq_idx_ptr, dout_ptr, local_ptr, decay_ptr,
    dim_per_group, n_groups, seqlen, dstate, padded_len, part_len,
    stride_delta_b, stride_delta_d, stride_A_d, stride_A_n, stride_z_b, stride_z_d, stride_seq_idx_b,
    stride_dout_b, stride_dout_d,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """For part p = program_id(2) + 1, the adjoint's recurrence run backwards through the part from zero
    (G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1}, which needs no state): exp(dt A) G at its first step into
    local_ptr, and the part's decay into decay_ptr, (batch, dim, parts, 16)."""
    pid_bg = tl.program_id(1)
    part = tl.program_id(2) + 1
    n_parts = tl.num_programs(2) + 1
    b, local_d, mask_d, d = _program_rows(tl.program_id(0), pid_bg, n_groups, dim_per_group, BLOCK_D)
    dim = dim_per_group * n_groups
    n = tl.arange(0, STATES)
    step = n % TILE
    mask_n = mask_d[:, None] & (n < dstate)[None, :]
    a2, no_D, bias = _channel_parameters(A_ptr, A_ptr, bias_ptr, d, mask_d, mask_n, n, stride_A_d, stride_A_n, False,
                                         HAS_BIAS, BLOCK_D)
    delta_rows = delta_ptr + b * stride_delta_b + d[:, None] * stride_delta_d
    bc_rows = BC_ptr + pid_bg * padded_len * ROW + n[None, :] + 0 * local_d[:, None]
    seq_rows = seq_idx_ptr + b * stride_seq_idx_b + 0 * local_d[:, None] if HAS_SEQ_IDX else delta_rows
    dout_rows = dout_ptr + b * stride_dout_b + d[:, None] * stride_dout_d
    z_rows = z_ptr + b * stride_z_b + d[:, None] * stride_z_d if HAS_Z else dout_rows
    G = tl.zeros((BLOCK_D, STATES), dtype=tl.float32)
    decay = tl.full((BLOCK_D, STATES), 1.0, dtype=tl.float32)  # of the step after
    dt_sum = tl.zeros((BLOCK_D, STATES), dtype=tl.float32)
    keep_all = tl.full((BLOCK_D, STATES), 1.0, dtype=tl.float32)
    start = part * part_len
    n_tiles = tl.cdiv(tl.minimum(start + part_len, seqlen) - start, TILE)
    for tile_back in range(0, n_tiles):
        t0 = start + (n_tiles - 1 - tile_back) * TILE
        t = t0 + step
        mask = mask_d[:, None] & (t < seqlen)[None, :]
        dt, raw = _step_dt(delta_rows, t, mask, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
        keep = _document_keep(seq_rows, t, mask) if HAS_SEQ_IDX else dt
        _, _, _, dyg = _gated_dout(dout_rows, z_rows, t, mask, HAS_Z, FAST_MATH)
        rows = bc_rows + t0 * ROW
        for back in tl.static_range(TILE):  # step TILE - 1 - back (no constexpr is reassigned in the loop)
            G = decay * G + tl.load(rows + ((TILE - 1 - back) * ROW + STATES)) * _at(dyg, TILE - 1 - back, BLOCK_D)
            decay = _decay(dt, keep, TILE - 1 - back, a2, BLOCK_D, HAS_SEQ_IDX)
        dt_sum += dt
        if HAS_SEQ_IDX:
            keep_all *= keep
    part_cells = _part_cells(b, dim, d, n_parts, part, n)
    tl.store(local_ptr + part_cells, decay * G, mask=mask_d[:, None])
    tl.store(decay_ptr + part_cells, _part_decay(a2, dt_sum, keep_all, BLOCK_D), mask=mask_d[:, None])


@triton.jit
def _adjoint_step(G, decay_next, dA, h, a2, dt, dtu, u, dyg, keep, rows, part_row, n, BLOCK_D: tl.constexpr,
                  DETERMINISTIC: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    """One step backwards. G enters as dL/dh of the next step and leaves as this step's; h is this step's
    state. Writes the step's dB/dC summed over the program's channels to part_row[0:32]; returns
    (G, this step's decay, dA, dL/d dt, sum_n G B, y - D u); u, dt, dtu, dyg and keep (0 where the step
    starts another document) are this step's in every column."""
    B = tl.load(rows)
    C = tl.load(rows + STATES)
    G = decay_next * G + C * dyg
    decayed = h - dtu * B  # exp(dt A) h_{t-1}, recovered from h_t
    decay = tl.exp2(dt * a2)
    if HAS_SEQ_IDX:  # a document's first step: nothing decayed into it (exactly, not up to rounding)
        decayed = decayed * keep
        decay = decay * keep
    Gd = G * decayed
    dA += dt * Gd
    sum_GB = tl.sum(G * B, axis=1)[:, None]
    ddt = LN_2 * tl.sum(a2 * Gd, axis=1)[:, None] + u * sum_GB
    sums = tl.sum(tl.join(G * dtu, h * dyg), axis=0)
    if DETERMINISTIC:
        tl.store(part_row + tl.join(n, n + STATES), sums)
    else:
        tl.atomic_add(part_row + tl.join(n, n + STATES), sums, sem="relaxed")
    return G, decay, dA, ddt, sum_GB, tl.sum(h * C, axis=1)[:, None]


@triton.jit
def _write_tile_gradients(du_ptrs, ddelta_ptrs, dz_ptrs, out_z_ptrs, ddt, gb, y, u, dt, raw, dout, dyg, z, z_sigmoid,
                          D, dD, dbias, mask, once, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SOFTPLUS: tl.constexpr, STORE_OUT_Z: tl.constexpr, FAST_MATH: tl.constexpr):
    """A tile's du, ddelta, dz (and the recomputed gated output) from its per-step sums (ddt: dL/d dt,
    gb: sum_n G B, y: y - D u, each step's in its columns); returns dD and d delta_bias, accumulated."""
    du = dt * gb
    if HAS_D:
        du += dyg * D
        dD += tl.where(once, dyg * u, 0.0)
    tl.store(du_ptrs, du, mask=mask & once)
    if SOFTPLUS:
        ddt = ddt * _sigmoid(raw, FAST_MATH)
    ddt = tl.where(mask, ddt, 0.0)
    tl.store(ddelta_ptrs, ddt, mask=mask & once)
    if HAS_BIAS:
        dbias += tl.where(once, ddt, 0.0)
    if HAS_Z:
        if HAS_D:
            y += u * D
        tl.store(dz_ptrs, dout * y * z_sigmoid * (1.0 + z * (1.0 - z_sigmoid)), mask=mask & once)
        if STORE_OUT_Z:
            tl.store(out_z_ptrs, y * z * z_sigmoid, mask=mask & once)
    return dD, dbias


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, BC_ptr, D_ptr, z_ptr, bias_ptr, seq_idx_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, out_z_ptr, dBC_part_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr, states_ptr,
    saved_ptr, carry_ptr,
    dim_per_group, n_groups, seqlen, dstate, padded_len, n_segments, segments_per_part,
    stride_saved_b, stride_saved_d, stride_saved_p, stride_saved_n,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_A_d, stride_A_n,
    stride_z_b, stride_z_d, stride_seq_idx_b, stride_dout_b, stride_dout_d, stride_du_b, stride_du_d,
    stride_ddelta_b, stride_ddelta_d, stride_dz_b, stride_dz_d, stride_out_z_b, stride_out_z_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, STORE_OUT_Z: tl.constexpr, BLOCK_D: tl.constexpr, SEGMENT: tl.constexpr,
    HAS_PARTS: tl.constexpr, DETERMINISTIC: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """The backward of one part of the sequence (program_id 2; see ScanConfig.backward_parts): from the state
    the forward saved at the part's start (saved_ptr, (batch, dim, parts, d_state); zero for the first) and the
    adjoint carried in from the parts after it (carry_ptr, (batch, dim, parts, 16))."""
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    part = tl.program_id(2)
    n_parts = tl.num_programs(2)
    program = pid_bg * tl.num_programs(0) + pid_d
    b, local_d, mask_d, d = _program_rows(pid_d, pid_bg, n_groups, dim_per_group, BLOCK_D)
    dim = dim_per_group * n_groups
    n = tl.arange(0, STATES)
    step = n % TILE
    once = (n < TILE)[None, :]
    mask_n = mask_d[:, None] & (n < dstate)[None, :]
    a2, D, bias = _channel_parameters(A_ptr, D_ptr, bias_ptr, d, mask_d, mask_n, n, stride_A_d, stride_A_n, HAS_D,
                                      HAS_BIAS, BLOCK_D)
    u_rows = u_ptr + b * stride_u_b + d[:, None] * stride_u_d
    delta_rows = delta_ptr + b * stride_delta_b + d[:, None] * stride_delta_d
    bc_rows = BC_ptr + pid_bg * padded_len * ROW + n[None, :] + 0 * local_d[:, None]
    seq_rows = seq_idx_ptr + b * stride_seq_idx_b + 0 * local_d[:, None] if HAS_SEQ_IDX else u_rows
    dout_rows = dout_ptr + b * stride_dout_b + d[:, None] * stride_dout_d
    z_rows = z_ptr + b * stride_z_b + d[:, None] * stride_z_d if HAS_Z else dout_rows
    # dB/dC: this program's own partial-sum rows, or (not DETERMINISTIC) the one sum all programs add into
    part_rows = dBC_part_ptr + (program if DETERMINISTIC else pid_bg) * padded_len * ROW
    # Saved states, [program, part, slot, channel, 16] fp32: slot s < segments_per_part holds the state before
    # the part's segment s, slot segments_per_part + k the state before tile k of the segment being worked on.
    tiles_per_segment: tl.constexpr = SEGMENT // TILE
    slot_size: tl.constexpr = BLOCK_D * STATES
    slots = (states_ptr + (program * n_parts + part) * (segments_per_part + tiles_per_segment) * slot_size
             + tl.arange(0, BLOCK_D)[:, None] * STATES + n[None, :])
    tile_slots = slots + segments_per_part * slot_size
    zero = tl.zeros((BLOCK_D, STATES), dtype=tl.float32)
    first_segment = part * segments_per_part
    end_segment = tl.minimum(first_segment + segments_per_part, n_segments)

    h = zero
    if HAS_PARTS:
        if part > 0:
            h = tl.load(saved_ptr + b * stride_saved_b + d[:, None] * stride_saved_d + (part - 1) * stride_saved_p
                        + n[None, :] * stride_saved_n, mask=mask_n, other=0.0)
    for segment in range(first_segment, end_segment):
        tl.store(slots + (segment - first_segment) * slot_size, h)
        for t0 in range(segment * SEGMENT, (segment + 1) * SEGMENT, TILE):
            t = t0 + step
            mask = mask_d[:, None] & (t < seqlen)[None, :]
            u, dt, _ = _step_inputs(u_rows, delta_rows, t, mask, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
            keep = _document_keep(seq_rows, t, mask) if HAS_SEQ_IDX else dt
            h = _advance_tile(h, a2, dt, dt * u, keep, bc_rows + t0 * ROW, BLOCK_D, HAS_SEQ_IDX)

    G = zero  # dL/dh of the step after
    decay = zero  # the decay of the step after
    if HAS_PARTS:  # the carry is exp(dt A) G of the next part's first step
        G = tl.load(carry_ptr + _part_cells(b, dim, d, n_parts, part, n), mask=mask_d[:, None], other=0.0)
        decay = tl.full((BLOCK_D, STATES), 1.0, dtype=tl.float32)
    dA = zero
    dD = zero  # summed over the columns that hold each step once
    dbias = zero
    for segment_back in range(0, end_segment - first_segment):
        segment = end_segment - 1 - segment_back
        if SEGMENT > TILE:
            h = tl.load(slots + (segment - first_segment) * slot_size)
            for tile in range(0, tiles_per_segment):
                tl.store(tile_slots + tile * slot_size, h)
                t0 = segment * SEGMENT + tile * TILE
                t = t0 + step
                mask = mask_d[:, None] & (t < seqlen)[None, :]
                u, dt, _ = _step_inputs(u_rows, delta_rows, t, mask, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
                keep = _document_keep(seq_rows, t, mask) if HAS_SEQ_IDX else dt
                h = _advance_tile(h, a2, dt, dt * u, keep, bc_rows + t0 * ROW, BLOCK_D, HAS_SEQ_IDX)
        for tile_back in range(0, tiles_per_segment):
            tile = tiles_per_segment - 1 - tile_back
            t0 = segment * SEGMENT + tile * TILE
            t = t0 + step
            mask = mask_d[:, None] & (t < seqlen)[None, :]
            u, dt, raw = _step_inputs(u_rows, delta_rows, t, mask, bias, HAS_BIAS, SOFTPLUS, FAST_MATH)
            keep = _document_keep(seq_rows, t, mask) if HAS_SEQ_IDX else dt
            dtu = dt * u
            dout, z, z_sigmoid, dyg = _gated_dout(dout_rows, z_rows, t, mask, HAS_Z, FAST_MATH)
            rows = bc_rows + t0 * ROW
            part_row = part_rows + t0 * ROW
            # the tile's 4 states, recomputed from the one saved before it
            if SEGMENT > TILE:
                s0 = tl.load(tile_slots + tile * slot_size)
            else:  # a segment is one tile: the first pass saved its state
                s0 = tl.load(slots + (segment - first_segment) * slot_size)
            s1 = _state_after(s0, 0, a2, dt, dtu, keep, rows, BLOCK_D, HAS_SEQ_IDX)
            s2 = _state_after(s1, 1, a2, dt, dtu, keep, rows, BLOCK_D, HAS_SEQ_IDX)
            s3 = _state_after(s2, 2, a2, dt, dtu, keep, rows, BLOCK_D, HAS_SEQ_IDX)
            s4 = _state_after(s3, 3, a2, dt, dtu, keep, rows, BLOCK_D, HAS_SEQ_IDX)
            G, decay, dA, ddt_3, gb_3, y_3 = _adjoint_step(
                G, decay, dA, s4, a2, _at(dt, 3, BLOCK_D), _at(dtu, 3, BLOCK_D), _at(u, 3, BLOCK_D),
                _at(dyg, 3, BLOCK_D), _at(keep, 3, BLOCK_D) if HAS_SEQ_IDX else keep, rows + 3 * ROW, part_row + 3 * ROW, n, BLOCK_D,
                DETERMINISTIC, HAS_SEQ_IDX)
            G, decay, dA, ddt_2, gb_2, y_2 = _adjoint_step(
                G, decay, dA, s3, a2, _at(dt, 2, BLOCK_D), _at(dtu, 2, BLOCK_D), _at(u, 2, BLOCK_D),
                _at(dyg, 2, BLOCK_D), _at(keep, 2, BLOCK_D) if HAS_SEQ_IDX else keep, rows + 2 * ROW, part_row + 2 * ROW, n, BLOCK_D,
                DETERMINISTIC, HAS_SEQ_IDX)
            G, decay, dA, ddt_1, gb_1, y_1 = _adjoint_step(
                G, decay, dA, s2, a2, _at(dt, 1, BLOCK_D), _at(dtu, 1, BLOCK_D), _at(u, 1, BLOCK_D),
                _at(dyg, 1, BLOCK_D), _at(keep, 1, BLOCK_D) if HAS_SEQ_IDX else keep, rows + ROW, part_row + ROW, n, BLOCK_D,
                DETERMINISTIC, HAS_SEQ_IDX)
            G, decay, dA, ddt_0, gb_0, y_0 = _adjoint_step(
                G, decay, dA, s1, a2, _at(dt, 0, BLOCK_D), _at(dtu, 0, BLOCK_D), _at(u, 0, BLOCK_D),
                _at(dyg, 0, BLOCK_D), _at(keep, 0, BLOCK_D) if HAS_SEQ_IDX else keep, rows, part_row, n, BLOCK_D,
                DETERMINISTIC, HAS_SEQ_IDX)
            is_0, is_1, is_2 = step[None, :] == 0, step[None, :] == 1, step[None, :] == 2
            ddt = tl.where(is_0, ddt_0, tl.where(is_1, ddt_1, tl.where(is_2, ddt_2, ddt_3)))
            gb = tl.where(is_0, gb_0, tl.where(is_1, gb_1, tl.where(is_2, gb_2, gb_3)))
            y = tl.where(is_0, y_0, tl.where(is_1, y_1, tl.where(is_2, y_2, y_3)))
            dD, dbias = _write_tile_gradients(
                du_ptr + b * stride_du_b + d[:, None] * stride_du_d + t[None, :],
                ddelta_ptr + b * stride_ddelta_b + d[:, None] * stride_ddelta_d + t[None, :],
                dz_ptr + b * stride_dz_b + d[:, None] * stride_dz_d + t[None, :] if HAS_Z else du_ptr,
                out_z_ptr + b * stride_out_z_b + d[:, None] * stride_out_z_d + t[None, :] if STORE_OUT_Z else du_ptr,
                ddt, gb, y, u, dt, raw, dout, dyg, z, z_sigmoid, D, dD, dbias,
                mask, once, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, STORE_OUT_Z, FAST_MATH)
    # per batch row and part; torch.sum adds the rows
    row = b * n_parts + part
    tl.store(dA_part_ptr + (row * dim + d[:, None]) * dstate + n[None, :], dA, mask=mask_n)
    if HAS_D:
        tl.store(dD_part_ptr + row * dim + d, tl.sum(dD, axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + row * dim + d, tl.sum(dbias, axis=1), mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Launch configuration


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Tile sizes of the forward and backward launches. A warp holds 8 channels (4 threads each, 4
    states per thread); more channels per program than 8 x warps give a thread several channels."""

    # Defaults: the fastest of a sweep on one H100 at 2.8b, batch 8, seq 2048, among those whose backward
    # needs at most ~0.35 GB beyond mamba-ssm's (docs/benchmarks.md)
    forward_block_d: int = 8  # channels per forward program (8 per warp: one channel per 4 threads)
    forward_warps: int = 1
    forward_max_registers: int | None = None  # a cap on registers per thread (more warps fit; may spill)
    backward_block_d: int = 8  # channels per backward program; warps of one program meet at every step
    backward_warps: int = 1
    backward_max_registers: int | None = 128
    segment: int = 16  # steps between the states the backward's first pass saves (a multiple of 4)
    # dB/dC: False adds each program's per-step sums into one fp32 sum with atomic adds (float addition
    # in no fixed order); True writes per-program partial sums that one torch.sum adds in a fixed order:
    # bitwise repeatable, slower, and one fp32 (seqlen, 32) row per program (d_inner / 8 rows per batch row)
    deterministic: bool = False
    # Parts of the sequence run side by side. A program walks its channels' steps one at a time, so a small
    # batch or a long sequence leaves warp slots of the GPU empty, and any batch can end on a partial wave of
    # programs. Split into parts, each part's program starts from the state the parts before it hand on
    # (forward: each part first runs from zero to get its own end state and decay, then again from its true
    # start; backward: the forward saved each part's start state, and a light pass carries the adjoint
    # back across parts). None: as many as the model of warp slots below says pays; a number forces it.
    forward_parts: int | None = None
    backward_parts: int | None = None
    # The shortest parts that None picks. A forward split runs each part twice and adds two launches: on one H100
    # it paid at 8k-16k steps (2.8b batch 1 at 16k: 3.7 -> 1.7 ms) but not reliably at 2k (docs/benchmarks.md).
    min_backward_part_steps: int = 128
    min_forward_part_steps: int = 2048

    def __post_init__(self):
        if self.segment <= 0 or self.segment % TILE_STEPS:
            raise ValueError(f"ScanConfig.segment must be a positive multiple of {TILE_STEPS}, got {self.segment}")
        for name in ("forward_parts", "backward_parts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ScanConfig.{name} must be None or at least 1, got {getattr(self, name)}")


# The warps of one kind of program that a multiprocessor holds at the default register use (64K registers):
# the backward is capped at 128 registers per thread (16 warps); the forward uses ~80 (Nsight Compute showed
# 23.7 active warps per multiprocessor on an H100).
WARPS_PER_MULTIPROCESSOR = {"forward": 24, "backward": 16}
# What splitting adds, relative to the unsplit pass: the forward runs each part twice (from zero, then from
# its start); the backward adds the adjoint's carry pass, which keeps no state (about a tenth of its work).
SPLIT_COST = {"forward": 0.7, "backward": 0.15}


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_parts(kind: str, programs: int, seqlen: int, warps: int, device: torch.device, config: ScanConfig) -> int:
    """The part count with the fewest waves of programs per unit of work, counting the split's own cost
    (waves are rounded up: a partial wave takes as long as a full one, since each program is a serial walk)."""
    if device.type != "cuda":
        return 1
    min_steps = config.min_forward_part_steps if kind == "forward" else config.min_backward_part_steps
    slots = max(1, _multiprocessors(device) * (WARPS_PER_MULTIPROCESSOR[kind] // warps))
    costs = {parts: math.ceil(programs * parts / slots) / parts * (1 + (SPLIT_COST[kind] if parts > 1 else 0.0))
             for parts in range(1, max(1, seqlen // min_steps) + 1)}
    least = min(costs.values())
    return min(parts for parts, cost in costs.items() if cost <= least * 1.03)  # the fewest parts near the least


def _part_len(seqlen: int, parts: int, quantum: int) -> int:
    return triton.cdiv(triton.cdiv(max(seqlen, 1), parts), quantum) * quantum


@dataclasses.dataclass(frozen=True)
class Partition:
    """How a scan's sequence is split: the backward's parts (the forward saves the state at the end of each)
    and the forward's, each forward part a whole number of backward parts."""

    backward_len: int
    backward_parts: int
    forward_len: int
    forward_parts: int


def partition(batch: int, dim: int, n_groups: int, seqlen: int, device: torch.device,
              config: ScanConfig | None = None) -> Partition:
    return _partition(batch, dim, n_groups, seqlen, torch.device(device), config or DEFAULT_CONFIG)


@functools.lru_cache(maxsize=256)  # every layer's forward asks, with the same few shapes (~30 us each to decide)
def _partition(batch: int, dim: int, n_groups: int, seqlen: int, device: torch.device, config: ScanConfig) -> Partition:
    dim_per_group = dim // n_groups
    backward = config.backward_parts or _auto_parts(
        "backward", triton.cdiv(dim_per_group, config.backward_block_d) * batch * n_groups, seqlen,
        config.backward_warps, device, config)
    backward_len = _part_len(seqlen, backward, config.segment)
    backward_parts = triton.cdiv(max(seqlen, 1), backward_len)
    forward = config.forward_parts or _auto_parts(
        "forward", triton.cdiv(dim_per_group, config.forward_block_d) * batch * n_groups, seqlen,
        config.forward_warps, device, config)
    per_part = triton.cdiv(backward_parts, min(forward, backward_parts))
    return Partition(backward_len, backward_parts, per_part * backward_len, triton.cdiv(backward_parts, per_part))


DEFAULT_CONFIG = ScanConfig()


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    def fail(message: str) -> None:
        raise SelectiveScanInputError(f"selective_scan: {message}")

    if u.dim() != 3:
        fail(f"u must be (batch, dim, seqlen), got shape {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    if tuple(delta.shape) != tuple(u.shape):
        fail(f"delta has shape {tuple(delta.shape)}, u has {tuple(u.shape)}; they must match")
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16) or delta.dtype != u.dtype:
        fail(f"u and delta must both be float32, float16 or bfloat16, got {u.dtype} and {delta.dtype}")
    if A.is_complex() or A.dtype != torch.float32 or A.dim() != 2 or A.shape[0] != dim:
        fail(f"A must be real float32 (dim={dim}, d_state), got {A.dtype} {tuple(A.shape)}")
    dstate = A.shape[1]
    if dstate > MAX_STATES:
        fail(f"d_state={dstate} is larger than {MAX_STATES}, the most states this kernel keeps per channel")
    for name, tensor in (("B", B), ("C", C)):
        if tensor.dim() != 4:
            fail(f"{name} must be input-dependent, (batch, groups, d_state, seqlen), got shape {tuple(tensor.shape)}")
        if tensor.shape[0] != batch or tensor.shape[2:] != (dstate, seqlen) or dim % tensor.shape[1]:
            fail(f"{name} has shape {tuple(tensor.shape)}; expected ({batch}, groups dividing {dim}, {dstate}, {seqlen})")
        if not tensor.is_floating_point() or tensor.is_complex():
            fail(f"{name} must be a real floating-point tensor, got {tensor.dtype}")
    if B.shape[1] != C.shape[1]:
        fail(f"B has {B.shape[1]} groups and C {C.shape[1]}; they must match")
    for name, tensor in (("D", D), ("delta_bias", delta_bias)):
        if tensor is not None and (tensor.shape != (dim,) or tensor.dtype != torch.float32):
            fail(f"{name} must be float32 of shape ({dim},), got {tensor.dtype} {tuple(tensor.shape)}")
    if z is not None and (tuple(z.shape) != tuple(u.shape) or z.dtype != u.dtype):
        fail(f"z must match u ({u.dtype} {tuple(u.shape)}), got {z.dtype} {tuple(z.shape)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) != 1:
        fail(f"all inputs must be on one device, got {sorted(str(device) for device in devices)}")


def _last_dim_contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def _strides(tensor: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return tuple(tensor.stride()[:dims]) if tensor is not None else (0,) * dims


def _bc_table(B: torch.Tensor, C: torch.Tensor, padded_len: int) -> torch.Tensor:
    """(batch x groups, padded_len, 32) fp32: each step's B states in columns 0-15 and C's in 16-31, zero past
    d_state and seqlen, so that the kernels read a step's B and C unmasked, in 16-byte pieces."""
    batch, groups, dstate, seqlen = B.shape
    table = torch.zeros(batch * groups, padded_len, ROW_WIDTH, device=B.device, dtype=torch.float32)
    table[:, :seqlen, :dstate] = B.reshape(batch * groups, dstate, seqlen).transpose(1, 2)
    table[:, :seqlen, MAX_STATES:MAX_STATES + dstate] = C.reshape(batch * groups, dstate, seqlen).transpose(1, 2)
    return table


def _register_cap(max_registers: int | None, tensor: torch.Tensor) -> dict:
    return {"maxnreg": max_registers} if max_registers and tensor.is_cuda else {}


def _device_context(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _document_index(seq_idx: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor | None:
    """seq_idx as the kernels read it: int32 (batch, seqlen) with the last dimension contiguous."""
    if seq_idx is None:
        return None
    if tuple(seq_idx.shape) != (u.shape[0], u.shape[2]) or seq_idx.is_floating_point() or seq_idx.is_complex() \
            or seq_idx.device != u.device:
        raise SelectiveScanInputError(f"selective_scan: seq_idx must be integer (batch, seqlen) = {(u.shape[0], u.shape[2])} "
                                      f"on {u.device}, got {seq_idx.dtype} {tuple(seq_idx.shape)} on {seq_idx.device}")
    return seq_idx.to(torch.int32).contiguous()


def _carry(local: torch.Tensor, decay: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Each part's starting carry from the parts' local results and decays (see _carry_kernel)."""
    batch, dim, parts, _ = local.shape
    carry = torch.empty_like(local)
    block = 256
    with _device_context(local):
        _carry_kernel[(triton.cdiv(batch * dim * MAX_STATES, block),)](local, decay, carry, batch * dim, parts,
                                                                      REVERSE=reverse, BLOCK=block, num_warps=2)
    return carry


def scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, store_out=True,
                 config: ScanConfig | None = None, seq_idx=None):
    """Runs the forward kernel. Returns (out or None, saved_states, out_z or None).

    ``saved_states`` is (batch, dim, parts, d_state) float32: the state at the end of each of the backward's
    parts of the sequence (``ScanConfig.backward_parts``); the last is the final state. ``out`` (before the
    z gate) is computed only when ``store_out``; ``out_z`` only when ``z`` is given. ``seq_idx`` (batch,
    seqlen), integers, resets the state where it changes: packed documents do not see each other.
    """
    config = config or DEFAULT_CONFIG
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    seq_idx = _document_index(seq_idx, u)
    u, delta, z = (_last_dim_contiguous(t) for t in (u, delta, z))
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_groups = B.shape[1]
    dim_per_group = dim // n_groups
    padded_len = triton.cdiv(max(seqlen, 1), TILE_STEPS) * TILE_STEPS
    bc = _bc_table(B, C, padded_len)
    out = torch.empty_like(u, memory_format=torch.contiguous_format) if store_out else None
    out_z = torch.empty_like(u, memory_format=torch.contiguous_format) if z is not None else None
    parts = partition(batch, dim, n_groups, seqlen, u.device, config)
    saved = (torch.empty if seqlen else torch.zeros)(batch, dim, parts.backward_parts, dstate, device=u.device,
                                                      dtype=torch.float32)
    programs_d = triton.cdiv(dim_per_group, config.forward_block_d)
    n_parts = parts.forward_parts

    def launch(local: bool, start=None, local_states=None, decay=None):
        _selective_scan_fwd_kernel[(programs_d, batch * n_groups, n_parts)](
            u, delta, A, bc, D, z, delta_bias, seq_idx, out, out_z, saved, start, local_states, decay,
            dim_per_group, n_groups, seqlen, dstate, padded_len, parts.forward_len, parts.backward_len,
            parts.backward_parts,
            *_strides(u, 2), *_strides(delta, 2), *A.stride(), *_strides(z, 2), *_strides(seq_idx, 1), *_strides(out, 2),
            *_strides(out_z, 2),
            HAS_D=D is not None, HAS_Z=z is not None and not local, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_SEQ_IDX=seq_idx is not None, STORE_OUT=store_out and not local,
            LOCAL=local, HAS_START=start is not None, BLOCK_D=config.forward_block_d, FAST_MATH=u.is_cuda,
            num_warps=config.forward_warps, **_register_cap(config.forward_max_registers, u),
        )

    with _device_context(u):
        if n_parts == 1:
            launch(local=False)
        else:
            local_states = torch.empty(batch, dim, n_parts, MAX_STATES, device=u.device, dtype=torch.float32)
            decay = torch.empty_like(local_states)
            launch(local=True, local_states=local_states, decay=decay)
            launch(local=False, start=_carry(local_states, decay, reverse=False))
    return out, saved, out_z


def scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus=False, dz=None,
                  recompute_out_z=False, config: ScanConfig | None = None, seq_idx=None, saved_states=None):
    """Runs the backward kernel and adds up its partial sums.

    Returns (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z): du/ddelta/dz in the inputs' dtype,
    dA/dD/ddelta_bias float32, dB/dC in B's/C's dtype, None for what does not apply. ``dz`` may be a
    preallocated tensor to write into (any strides with the last one 1), as mamba-ssm's block passes.
    ``seq_idx``: as the forward was given it. ``saved_states``: the forward's (any strides); its parts are the
    backward's. Without it the backward runs the sequence as one part.
    """
    config = config or DEFAULT_CONFIG
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    seq_idx = _document_index(seq_idx, u)
    u, delta, z, dout = (_last_dim_contiguous(t) for t in (u, delta, z, dout))
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_groups = B.shape[1]
    dim_per_group = dim // n_groups
    if tuple(dout.shape) != (batch, dim, seqlen):
        raise SelectiveScanInputError(f"selective_scan backward: dout has shape {tuple(dout.shape)}, "
                                      f"expected {(batch, dim, seqlen)}")
    n_segments = triton.cdiv(max(seqlen, 1), config.segment)
    padded_len = n_segments * config.segment
    bc = _bc_table(B, C, padded_len)
    n_programs_d = triton.cdiv(dim_per_group, config.backward_block_d)
    programs = n_programs_d * batch * n_groups
    float_options = dict(device=u.device, dtype=torch.float32)
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
    if z is not None:
        if dz is None:
            dz = torch.empty_like(z, memory_format=torch.contiguous_format)
        elif dz.shape != z.shape or dz.dtype != z.dtype or dz.stride(-1) != 1:
            raise SelectiveScanInputError(f"selective_scan backward: dz must be {z.dtype} {tuple(z.shape)} with "
                                          f"its last dimension contiguous, got {dz.dtype} {tuple(dz.shape)}")
    else:
        dz = None
    out_z = torch.empty_like(u, memory_format=torch.contiguous_format) if z is not None and recompute_out_z else None
    if config.deterministic:
        dBC_part = torch.empty(batch * n_groups, n_programs_d, padded_len, ROW_WIDTH, **float_options)
    else:
        dBC_part = torch.zeros(batch * n_groups, 1, padded_len, ROW_WIDTH, **float_options)
    if saved_states is None:
        n_parts, part_len = 1, n_segments * config.segment
    else:
        n_parts = saved_states.shape[2]
        part_len = _part_len(seqlen, n_parts, config.segment)
        if tuple(saved_states.shape) != (batch, dim, n_parts, dstate) or triton.cdiv(max(seqlen, 1), part_len) != n_parts:
            raise SelectiveScanInputError(
                f"selective_scan backward: the forward's saved states {tuple(saved_states.shape)} do not fit "
                f"(batch, dim, parts, d_state) = ({batch}, {dim}, parts, {dstate}) with segment {config.segment} "
                f"(was the ScanConfig changed between forward and backward?)")
    segments_per_part = part_len // config.segment
    grid = (n_programs_d, batch * n_groups, n_parts)
    dA_part = torch.empty(batch * n_parts, dim, dstate, **float_options)
    dD_part = torch.empty(batch * n_parts, dim, **float_options) if D is not None else None
    dbias_part = torch.empty(batch * n_parts, dim, **float_options) if delta_bias is not None else None
    states = torch.empty(programs * n_parts, segments_per_part + config.segment // TILE_STEPS, config.backward_block_d,
                         MAX_STATES, **float_options)
    with _device_context(u):
        carry = None
        if n_parts > 1:
            local = torch.empty(batch, dim, n_parts, MAX_STATES, **float_options)
            decay = torch.empty_like(local)
            _adjoint_carry_kernel[(n_programs_d, batch * n_groups, n_parts - 1)](
                delta, A, bc, z, delta_bias, seq_idx, dout, local, decay,
                dim_per_group, n_groups, seqlen, dstate, padded_len, part_len,
                *_strides(delta, 2), *A.stride(), *_strides(z, 2), *_strides(seq_idx, 1), *_strides(dout, 2),
                HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                HAS_SEQ_IDX=seq_idx is not None, BLOCK_D=config.backward_block_d, FAST_MATH=u.is_cuda,
                num_warps=config.backward_warps, **_register_cap(config.backward_max_registers, u),
            )
            carry = _carry(local, decay, reverse=True)
        _selective_scan_bwd_kernel[grid](
            u, delta, A, bc, D, z, delta_bias, seq_idx, dout, du, ddelta, dz, out_z, dBC_part, dA_part, dD_part,
            dbias_part, states, saved_states, carry,
            dim_per_group, n_groups, seqlen, dstate, padded_len, n_segments, segments_per_part,
            *_strides(saved_states, 4),
            *_strides(u, 2), *_strides(delta, 2), *A.stride(), *_strides(z, 2), *_strides(seq_idx, 1),
            *_strides(dout, 2), *_strides(du, 2),
            *_strides(ddelta, 2), *_strides(dz, 2), *_strides(out_z, 2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            HAS_SEQ_IDX=seq_idx is not None, STORE_OUT_Z=out_z is not None, BLOCK_D=config.backward_block_d,
            SEGMENT=config.segment, HAS_PARTS=n_parts > 1,
            DETERMINISTIC=config.deterministic, FAST_MATH=u.is_cuda,
            num_warps=config.backward_warps, **_register_cap(config.backward_max_registers, u),
        )
    dBC = dBC_part.sum(dim=1)[:, :seqlen].view(batch, n_groups, seqlen, ROW_WIDTH).transpose(2, 3)
    dB = dBC[:, :, :dstate].to(B.dtype, memory_format=torch.contiguous_format)
    dC = dBC[:, :, MAX_STATES:MAX_STATES + dstate].to(C.dtype, memory_format=torch.contiguous_format)
    dA = dA_part.sum(dim=0)
    dD = dD_part.sum(dim=0) if D is not None else None
    ddelta_bias = dbias_part.sum(dim=0) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z


# ----------------------------------------------------------------------------------------------
# Public interface


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False, seq_idx=None):
        squeeze_B, squeeze_C = B.dim() == 3, C.dim() == 3
        B = B.unsqueeze(1) if squeeze_B else B
        C = C.unsqueeze(1) if squeeze_C else C
        out, saved_states, out_z = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                store_out=z is None, seq_idx=seq_idx)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, saved_states)
        ctx.delta_softplus = delta_softplus
        ctx.squeeze = (squeeze_B, squeeze_C)
        result = out if z is None else out_z
        if not return_last_state:
            return result
        last_state = saved_states[:, :, -1].contiguous()
        ctx.mark_non_differentiable(last_state)
        return result, last_state

    @staticmethod
    def backward(ctx, dout, *unused):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, saved_states = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, _ = scan_backward(
            u, delta, A, B, C, D, z, delta_bias, dout, ctx.delta_softplus, seq_idx=seq_idx, saved_states=saved_states)
        squeeze_B, squeeze_C = ctx.squeeze
        return (du, ddelta, dA, dB.squeeze(1) if squeeze_B else dB, dC.squeeze(1) if squeeze_C else dC,
                dD, dz, ddelta_bias, None, None, None)


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, seq_idx: torch.Tensor | None = None):
    """mamba-ssm's ``selective_scan_fn`` (same arguments, same results) on kotomamba's Triton kernels.

    u, delta, z: (batch, dim, seqlen); A: (dim, d_state) real float32; B, C: (batch, groups, d_state,
    seqlen) or (batch, d_state, seqlen); D, delta_bias: (dim,) float32. Returns out (batch, dim,
    seqlen) in u's dtype, and with ``return_last_state`` also the final state (batch, dim, d_state)
    float32, which gets no gradient. ``seq_idx`` (batch, seqlen), integers, is not in mamba-ssm's: the state
    is reset where it changes, so that documents packed into one sequence do not see each other.
    """
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, seq_idx)


# ----------------------------------------------------------------------------------------------
# mamba-ssm's compiled-extension interface, so that its own MambaInnerFn runs on these kernels


def handles(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> bool:
    """Whether this kernel covers the call: real A, input-dependent B and C (all Mamba-1 uses)."""
    return not A.is_complex() and B.dim() == 4 and C.dim() == 4


class SelectiveScanExtension(types.ModuleType):
    """Stands in for ``selective_scan_cuda`` (its ``fwd``/``bwd`` contract) with the Triton kernels.

    Calls this kernel does not cover (complex A, constant B/C), and with ``min_channels`` calls of fewer
    channels (batch x dim), go to the real extension unchanged.
    With ``z``, ``fwd`` returns an empty tensor for the pre-gate output: mamba-ssm's callers only hand
    it back to ``bwd``, which recomputes it. The intermediate ``x`` holds the state at the end of each of the
    backward's parts, in the CUDA kernel's layout (batch, dim, parts, 2 d_state) with the states in the odd
    entries (the final state last, where mamba-ssm's ``SelectiveScanFn`` reads it); the backward recomputes
    everything else. Within
    ``kotomamba.documents.packed_documents`` both reset the state at each packed document's start.
    """

    def __init__(self, extension: types.ModuleType | None, min_channels: int | None = None):
        super().__init__("selective_scan_cuda")
        self.extension = extension
        self.min_channels = min_channels  # smaller calls (batch x dim) go to the real extension

    def _ours(self, u, A, B, C) -> bool:
        return handles(A, B, C) and (self.min_channels is None or u.shape[0] * u.shape[1] >= self.min_channels)

    def _fallback(self, name: str):
        if active_document_index() is not None:  # mamba-ssm's kernel would let documents see each other
            raise SelectiveScanInputError(f"selective_scan_cuda.{name}: packed documents need kotomamba's scan for "
                                          f"every call (this one would go to mamba-ssm's, which takes no seq_idx)")
        if self.extension is None:
            raise SelectiveScanInputError(f"selective_scan_cuda.{name}: complex A or constant B/C need mamba-ssm's "
                                          f"CUDA extension, which is not installed")
        return getattr(self.extension, name)

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        if not self._ours(u, A, B, C):
            return self._fallback("fwd")(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        out, saved_states, out_z = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                store_out=z is None, seq_idx=active_document_index())
        # mamba-ssm's x layout, (batch, dim, chunks, 2 d_state) with the states in the odd entries: one chunk per
        # part of the backward, the final state last (where mamba-ssm's SelectiveScanFn reads it)
        x = torch.stack((torch.zeros_like(saved_states), saved_states), dim=-1).flatten(-2)
        if z is None:
            return [out, x]
        return [u.new_empty(0), x, out_z]

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
        if not self._ours(u, A, B, C):  # the same decision as the forward's: the same shapes
            return self._fallback("bwd")(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus,
                                         recompute_out_z)
        du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z = scan_backward(
            u, delta, A, B, C, D, z, delta_bias, dout, delta_softplus, dz=dz, recompute_out_z=recompute_out_z,
            seq_idx=active_document_index(), saved_states=x[..., 1::2])
        result = [du, ddelta, dA, dB, dC, dD, ddelta_bias]
        if z is not None:
            result.append(dz)
            if recompute_out_z:
                result.append(out_z)
        return result
