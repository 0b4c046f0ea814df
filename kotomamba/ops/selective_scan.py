"""Mamba-1's selective scan in Triton: forward and a deterministic backward.

Computes exactly what ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` computes for a
real ``A`` and input-dependent ``B``/``C`` (Mamba-1's case), per channel ``d`` and state ``n``::

    dt_t   = softplus(delta_t + delta_bias)            (each optional)
    h_t    = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
    y_t    = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t  = y_t * silu(z_t)                            (z optional)

How the work is laid out, and why:
- A program owns ``BLOCK_D`` channels of one (batch, group) and walks the sequence in chunks of ``T``
  steps. Every tile is two-dimensional, [channels, steps], in one layout (each thread holds a run of
  consecutive steps of one channel, as the 16-byte loads give it); a loop over the ``d_state`` states
  runs one ``tl.associative_scan`` along the steps per state, mostly inside each thread. B and C rows
  are loaded once per chunk for all of the program's channels (mamba-ssm's CUDA kernel reloads them
  for every channel).
- The forward writes the state at the end of every chunk (fp32, gathered in the columns of a tile and
  stored once per chunk); the next chunk, and the backward, read each state back from memory instead
  of moving it between threads. The backward restarts each chunk from its stored state instead of
  re-running the whole forward, and runs the adjoint recurrence::

      G_t = C_t * dy_t + exp(dt_{t+1} A) * G_{t+1}          (dL/dh_t)

  as a reverse scan through the next step's decay (dt is loaded again one step ahead), with the
  adjoint of the chunk after entering at the chunk's last step. ``exp(dt_t A) h_{t-1}`` is recovered
  as ``h_t - dt_t B_t u_t``.
- dB and dC sum over every channel of a group. A backward program handles ``SPLIT`` blocks of
  channels one after another and adds their contributions to its own partial-sum rows; the partial
  sums of the programs are added by one ``torch.sum``. No atomics anywhere: the backward is bitwise
  deterministic (mamba-ssm's accumulates dB/dC/dA with atomic adds and is not).
- When ``z`` is given, the pre-gate output is not stored (mamba-ssm's interface keeps it only for
  its own backward); the backward recomputes it. By count, not measured: the chunk states take
  d_state x 4 bytes per T steps of a channel where that output took 2 bytes per step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types

import torch
import triton
import triton.language as tl

from kotomamba.errors import KotomambaError

LOG2_E = tl.constexpr(1.4426950408889634)  # a constexpr: kernels may read no other global


class SelectiveScanInputError(KotomambaError, ValueError):
    """The inputs are outside what this kernel computes (shape, dtype, layout or device)."""


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (threshold 20) without losing e^x where 1 + e^x rounds to 1
    e = tl.exp(-tl.abs(x))
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _affine_combine(a_first, b_first, a_next, b_next):
    # h -> a h + b, applied first then next: h -> a_next (a_first h + b_first) + b_next. A reverse scan
    # hands the later segment first, so the same function composes the adjoint's maps backwards.
    return a_first * a_next, a_next * b_first + b_next


@triton.jit
def _time_step(delta_ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # (dt, the raw delta + bias that softplus saw): dt is 0 where masked, so those steps keep the state
    raw = tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, out_z_ptr, states_ptr,
    dim_per_group, n_groups, seqlen, dstate, n_chunks,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    stride_z_b, stride_z_d, stride_out_b, stride_out_d, stride_out_z_b, stride_out_z_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_OUT: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, UNROLL: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_groups
    g = pid_bg % n_groups
    dim = dim_per_group * n_groups
    local_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local_d < dim_per_group
    d = g * dim_per_group + local_d
    columns = tl.arange(0, T)
    is_last = (columns == T - 1)[None, :]
    # state n of channel d after chunk c: states[b, d, c, n]. The states leaving a chunk are gathered in
    # the columns of a tile and stored at its end; the next chunk reads each back from memory.
    state_base = states_ptr + (b * dim + d) * n_chunks * dstate
    state_tile = states_ptr + (b * dim + d[:, None]) * n_chunks * dstate + columns[None, :]
    mask_state = mask_d[:, None] & (columns[None, :] < dstate)
    if HAS_D:
        D = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else None
    A_rows = A_ptr + d * stride_A_d
    B_row = B_ptr + b * stride_B_b + g * stride_B_g
    C_row = C_ptr + b * stride_C_b + g * stride_C_g

    for chunk in range(0, n_chunks):
        t = chunk * T + columns
        mask_t = t < seqlen
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_start = mask_d & (d * 0 + chunk > 0)
        u = tl.load(u_ptr + b * stride_u_b + d[:, None] * stride_u_d + t[None, :], mask=mask_dt,
                    other=0.0).to(tl.float32)
        dt, _ = _time_step(delta_ptr + b * stride_delta_b + d[:, None] * stride_delta_d + t[None, :], mask_dt, bias,
                           HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        states_out = tl.zeros((BLOCK_D, T), dtype=tl.float32)
        for n in tl.range(0, dstate, loop_unroll_factor=UNROLL):
            A2 = tl.load(A_rows + n * stride_A_n, mask=mask_d, other=0.0) * LOG2_E
            Bn = tl.load(B_row + n * stride_B_n + t, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + n * stride_C_n + t, mask=mask_t, other=0.0).to(tl.float32)
            start = tl.load(state_base + (chunk - 1) * dstate + n, mask=mask_start, other=0.0)
            decay = tl.exp2(dt * A2[:, None])
            decay_prefix, inflow_prefix = tl.associative_scan((decay, dtu * Bn[None, :]), 1, _affine_combine)
            hs = decay_prefix * start[:, None] + inflow_prefix
            y += hs * Cn[None, :]
            # steps past the end keep the state, so the last column holds it also in a short last chunk
            last = tl.sum(tl.where(is_last, hs, 0.0), axis=1)
            states_out = tl.where(columns[None, :] == n, last[:, None], states_out)
        tl.store(state_tile + chunk * dstate, states_out, mask=mask_state)
        tl.debug_barrier()  # this chunk's states are read by other threads in the next one
        if HAS_D:
            y += u * D[:, None]
        if STORE_OUT:
            tl.store(out_ptr + b * stride_out_b + d[:, None] * stride_out_d + t[None, :], y, mask=mask_dt)
        if HAS_Z:
            z = tl.load(z_ptr + b * stride_z_b + d[:, None] * stride_z_d + t[None, :], mask=mask_dt,
                        other=0.0).to(tl.float32)
            tl.store(out_z_ptr + b * stride_out_z_b + d[:, None] * stride_out_z_d + t[None, :], y * z * tl.sigmoid(z),
                     mask=mask_dt)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, out_z_ptr,
    dB_part_ptr, dC_part_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr, carry_ptr,
    dim_per_group, n_groups, seqlen, dstate, n_chunks, n_programs_d,
    stride_u_b, stride_u_d, stride_delta_b, stride_delta_d, stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    stride_z_b, stride_z_d, stride_dout_b, stride_dout_d, stride_du_b, stride_du_d,
    stride_ddelta_b, stride_ddelta_d, stride_dz_b, stride_dz_d, stride_out_z_b, stride_out_z_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_OUT_Z: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, SPLIT: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // n_groups
    g = pid_bg % n_groups
    dim = dim_per_group * n_groups
    columns = tl.arange(0, T)
    is_first = (columns == 0)[None, :]
    is_last = (columns == T - 1)[None, :]
    B_row = B_ptr + b * stride_B_b + g * stride_B_g
    C_row = C_ptr + b * stride_C_b + g * stride_C_g
    # Partial dB/dC of this program: [batch, group, program, n, seqlen], fp32, summed over its sub-blocks
    part_base = (pid_bg * n_programs_d + pid_d) * dstate * seqlen
    # dL/dh entering a chunk from the next one: carry[parity, b, d, n], written and read in alternate halves
    carry_half = tl.num_programs(1) * dim_per_group * dstate

    for chunk_back in range(0, n_chunks):
        chunk = n_chunks - 1 - chunk_back
        t = chunk * T + columns
        mask_t = t < seqlen
        mask_next = t + 1 < seqlen
        carry_in = carry_ptr + (chunk_back % 2) * carry_half
        carry_out = carry_ptr + ((chunk_back + 1) % 2) * carry_half
        for split in range(0, SPLIT):
            local_d = (pid_d * SPLIT + split) * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d = local_d < dim_per_group
            d = g * dim_per_group + local_d
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_start = mask_d & (d * 0 + chunk > 0)
            mask_part = mask_t & (t * 0 + split > 0)
            bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else None
            delta_rows = delta_ptr + b * stride_delta_b + d[:, None] * stride_delta_d
            u_tile = u_ptr + b * stride_u_b + d[:, None] * stride_u_d + t[None, :]
            dout_tile = dout_ptr + b * stride_dout_b + d[:, None] * stride_dout_d + t[None, :]
            z_tile = z_ptr + b * stride_z_b + d[:, None] * stride_z_d + t[None, :] if HAS_Z else None
            dt, _ = _time_step(delta_rows + t[None, :], mask_dt, bias, HAS_BIAS, SOFTPLUS)
            # the next step's dt: the adjoint flows back through its decay exp(dt_{t+1} A)
            dt_next, _ = _time_step(delta_rows + t[None, :] + 1, mask_d[:, None] & mask_next[None, :], bias,
                                    HAS_BIAS, SOFTPLUS)
            dtu = dt * tl.load(u_tile, mask=mask_dt, other=0.0).to(tl.float32)
            dy = tl.load(dout_tile, mask=mask_dt, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_tile, mask=mask_dt, other=0.0).to(tl.float32)
                dy = dy * z * tl.sigmoid(z)
            state_base = states_ptr + ((b * dim + d) * n_chunks + chunk - 1) * dstate
            channel_state = (b * dim + d) * dstate
            sum_GB = tl.zeros((BLOCK_D, T), dtype=tl.float32)
            ddt = tl.zeros((BLOCK_D, T), dtype=tl.float32)
            y = tl.zeros((BLOCK_D, T), dtype=tl.float32)
            for n in tl.range(0, dstate, loop_unroll_factor=UNROLL):
                A = tl.load(A_ptr + d * stride_A_d + n * stride_A_n, mask=mask_d, other=0.0)
                Bn = tl.load(B_row + n * stride_B_n + t, mask=mask_t, other=0.0).to(tl.float32)
                Cn = tl.load(C_row + n * stride_C_n + t, mask=mask_t, other=0.0).to(tl.float32)
                # the forward inside the chunk, from the state the forward stored before it
                start = tl.load(state_base + n, mask=mask_start, other=0.0)
                decay = tl.exp2(dt * (A * LOG2_E)[:, None])
                inflow = dtu * Bn[None, :]
                decay_prefix, inflow_prefix = tl.associative_scan((decay, inflow), 1, _affine_combine)
                hs = decay_prefix * start[:, None] + inflow_prefix
                # the adjoint G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1}, as a reverse scan
                carry = tl.load(carry_in + channel_state + n, mask=mask_d, other=0.0)
                decay_next = tl.exp2(dt_next * (A * LOG2_E)[:, None])
                # the carry enters at the chunk's last step, so only the scan's sums are needed
                adjoint_in = dy * Cn[None, :] + tl.where(is_last, decay_next * carry[:, None], 0.0)
                _, G = tl.associative_scan((decay_next, adjoint_in), 1, _affine_combine, reverse=True)
                tl.store(carry_out + channel_state + n, tl.sum(tl.where(is_first, G, 0.0), axis=1), mask=mask_d)
                if HAS_Z:
                    y += hs * Cn[None, :]
                part_row = part_base + n * seqlen + t
                dC_row = dC_part_ptr + part_row
                tl.store(dC_row, tl.load(dC_row, mask=mask_part, other=0.0) + tl.sum(hs * dy, axis=0), mask=mask_t)
                dB_row = dB_part_ptr + part_row
                tl.store(dB_row, tl.load(dB_row, mask=mask_part, other=0.0) + tl.sum(G * dtu, axis=0), mask=mask_t)
                sum_GB += G * Bn[None, :]
                decayed_prev = hs - inflow  # exp(dt_t A) h_{t-1}
                AG_prev = G * decayed_prev
                ddt += A[:, None] * AG_prev
                dA_n = dA_part_ptr + channel_state + n
                tl.store(dA_n, tl.load(dA_n, mask=mask_d, other=0.0) + tl.sum(AG_prev * dt, axis=1), mask=mask_d)
            # u, dout, z and delta are loaded again rather than held in registers through the state loop
            u = tl.load(u_tile, mask=mask_dt, other=0.0).to(tl.float32)
            du = dt * sum_GB
            if HAS_D:
                D = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
                du += dy * D[:, None]
                dD_rows = dD_part_ptr + b * dim + d
                tl.store(dD_rows, tl.load(dD_rows, mask=mask_d, other=0.0) + tl.sum(dy * u, axis=1), mask=mask_d)
            tl.store(du_ptr + b * stride_du_b + d[:, None] * stride_du_d + t[None, :], du, mask=mask_dt)
            ddt += u * sum_GB
            if SOFTPLUS:
                _, dt_raw = _time_step(delta_rows + t[None, :], mask_dt, bias, HAS_BIAS, False)
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(mask_dt, ddt, 0.0)
            tl.store(ddelta_ptr + b * stride_ddelta_b + d[:, None] * stride_ddelta_d + t[None, :], ddt, mask=mask_dt)
            if HAS_BIAS:
                dbias_rows = dbias_part_ptr + b * dim + d
                tl.store(dbias_rows, tl.load(dbias_rows, mask=mask_d, other=0.0) + tl.sum(ddt, axis=1), mask=mask_d)
            if HAS_Z:
                if HAS_D:
                    y += u * D[:, None]
                dout = tl.load(dout_tile, mask=mask_dt, other=0.0).to(tl.float32)
                z = tl.load(z_tile, mask=mask_dt, other=0.0).to(tl.float32)
                z_sigmoid = tl.sigmoid(z)
                dz = dout * y * z_sigmoid * (1.0 + z * (1.0 - z_sigmoid))
                tl.store(dz_ptr + b * stride_dz_b + d[:, None] * stride_dz_d + t[None, :], dz, mask=mask_dt)
                if STORE_OUT_Z:
                    tl.store(out_z_ptr + b * stride_out_z_b + d[:, None] * stride_out_z_d + t[None, :],
                             y * z * z_sigmoid, mask=mask_dt)
            tl.debug_barrier()  # the next sub-block adds to the dB/dC rows, the next chunk reads the carries


# ----------------------------------------------------------------------------------------------
# Launch configuration


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Tile sizes of one launch pair. The forward stores a state every ``chunk`` steps and the backward
    restarts from those states, so both must use the same ``chunk``."""

    # Defaults: the fastest of a sweep on an H200 at 2.8b, batch 8, seq 2048 (docs/benchmarks.md)
    chunk: int = 32  # T: steps per scan tile (power of two; at least d_state)
    forward_block_d: int = 16  # channels per forward program
    forward_warps: int = 4
    forward_unroll: int = 1  # states per turn of the state loop (lets loads and scans of several overlap)
    backward_block_d: int = 16  # channels per backward sub-block
    backward_split: int | None = None  # sub-blocks per backward program; None: as many as still fill the GPU
    backward_warps: int = 4
    backward_unroll: int = 1


DEFAULT_CONFIG = ScanConfig()


def _backward_split(config: ScanConfig, blocks: int, device: torch.device) -> int:
    if config.backward_split is not None:
        return config.backward_split
    if device.type != "cuda":
        return 2
    # Enough programs for ~4 per multiprocessor; beyond that, fewer partial sums of dB/dC to add up.
    programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, blocks // programs_wanted))


# ----------------------------------------------------------------------------------------------
# Checks and launches


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
    if dstate > 256:
        fail(f"d_state={dstate} is larger than 256")
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


def _block_n(dstate: int) -> int:
    return max(2, triton.next_power_of_2(dstate))


def _chunk(config: ScanConfig, dstate: int) -> int:
    # the kernels carry the states in the columns of a [channels, chunk] tile
    return max(config.chunk, _block_n(dstate))


def scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, store_out=True,
                 config: ScanConfig | None = None):
    """Runs the forward kernel. Returns (out or None, chunk_states, out_z or None).

    ``chunk_states`` is (batch, dim, n_chunks, d_state) float32: the state after each chunk of
    ``config.chunk`` steps; its last entry is the final state. ``out`` (before the z gate) is
    computed only when ``store_out``; ``out_z`` only when ``z`` is given.
    """
    config = config or DEFAULT_CONFIG
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    u, delta, B, C, z = (_last_dim_contiguous(t) for t in (u, delta, B, C, z))
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_groups = B.shape[1]
    dim_per_group = dim // n_groups
    chunk = _chunk(config, dstate)
    n_chunks = max(1, triton.cdiv(seqlen, chunk))
    out = torch.empty_like(u, memory_format=torch.contiguous_format) if store_out else None
    out_z = torch.empty_like(u, memory_format=torch.contiguous_format) if z is not None else None
    states = torch.empty(batch, dim, n_chunks, dstate, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim_per_group, config.forward_block_d), batch * n_groups)
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _selective_scan_fwd_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, out, out_z, states,
            dim_per_group, n_groups, seqlen, dstate, n_chunks,
            *_strides(u, 2), *_strides(delta, 2), *A.stride(), *_strides(B, 3), *_strides(C, 3),
            *_strides(z, 2), *_strides(out, 2), *_strides(out_z, 2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            STORE_OUT=store_out, BLOCK_D=config.forward_block_d, T=chunk, UNROLL=config.forward_unroll,
            num_warps=config.forward_warps,
        )
    return out, states, out_z


def scan_backward(u, delta, A, B, C, D, z, delta_bias, dout, states, delta_softplus=False, dz=None,
                  recompute_out_z=False, config: ScanConfig | None = None):
    """Runs the backward kernel and adds up its partial sums.

    Returns (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z): du/ddelta/dz in the inputs' dtype,
    dA/dD/ddelta_bias float32, dB/dC in B's/C's dtype, None for what does not apply. ``dz`` may be a
    preallocated tensor to write into (any strides with the last one 1), as mamba-ssm's block passes.
    """
    config = config or DEFAULT_CONFIG
    u, delta, B, C, z, dout = (_last_dim_contiguous(t) for t in (u, delta, B, C, z, dout))
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_groups = B.shape[1]
    dim_per_group = dim // n_groups
    n_chunks = states.shape[2]
    chunk = _chunk(config, dstate)
    if states.shape != (batch, dim, n_chunks, dstate) or n_chunks != max(1, triton.cdiv(seqlen, chunk)):
        raise SelectiveScanInputError(
            f"selective_scan backward: chunk states of shape {tuple(states.shape)} do not come from a forward "
            f"of this input with chunk={chunk}")
    if tuple(dout.shape) != (batch, dim, seqlen):
        raise SelectiveScanInputError(f"selective_scan backward: dout has shape {tuple(dout.shape)}, "
                                      f"expected {(batch, dim, seqlen)}")
    blocks = batch * n_groups * triton.cdiv(dim_per_group, config.backward_block_d)
    split = _backward_split(config, blocks, u.device)
    n_programs_d = triton.cdiv(dim_per_group, config.backward_block_d * split)
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
    dB_part = torch.empty(batch, n_groups, n_programs_d, dstate, seqlen, **float_options)
    dC_part = torch.empty_like(dB_part)
    dA_part = torch.zeros(batch, dim, dstate, **float_options)
    carry = torch.zeros(2, batch, dim, dstate, **float_options)
    dD_part = torch.zeros(batch, dim, **float_options) if D is not None else None
    dbias_part = torch.zeros(batch, dim, **float_options) if delta_bias is not None else None
    grid = (n_programs_d, batch * n_groups)
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _selective_scan_bwd_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, states, dout, du, ddelta, dz, out_z,
            dB_part, dC_part, dA_part, dD_part, dbias_part, carry,
            dim_per_group, n_groups, seqlen, dstate, n_chunks, n_programs_d,
            *_strides(u, 2), *_strides(delta, 2), *A.stride(), *_strides(B, 3), *_strides(C, 3),
            *_strides(z, 2), *_strides(dout, 2), *_strides(du, 2), *_strides(ddelta, 2), *_strides(dz, 2),
            *_strides(out_z, 2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            STORE_OUT_Z=out_z is not None, BLOCK_D=config.backward_block_d, T=chunk, SPLIT=split,
            UNROLL=config.backward_unroll,
            num_warps=config.backward_warps,
        )
    dB = dB_part.sum(dim=2).to(B.dtype)
    dC = dC_part.sum(dim=2).to(C.dtype)
    dA = dA_part.sum(dim=0)
    dD = dD_part.sum(dim=0) if D is not None else None
    ddelta_bias = dbias_part.sum(dim=0) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z


# ----------------------------------------------------------------------------------------------
# Public interface


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
        squeeze_B, squeeze_C = B.dim() == 3, C.dim() == 3
        B = B.unsqueeze(1) if squeeze_B else B
        C = C.unsqueeze(1) if squeeze_C else C
        out, states, out_z = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, store_out=z is None)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus = delta_softplus
        ctx.squeeze = (squeeze_B, squeeze_C)
        result = out if z is None else out_z
        if not return_last_state:
            return result
        last_state = states[:, :, -1]
        ctx.mark_non_differentiable(last_state)
        return result, last_state

    @staticmethod
    def backward(ctx, dout, *unused):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, _ = scan_backward(
            u, delta, A, B, C, D, z, delta_bias, dout, states, ctx.delta_softplus)
        squeeze_B, squeeze_C = ctx.squeeze
        return (du, ddelta, dA, dB.squeeze(1) if squeeze_B else dB, dC.squeeze(1) if squeeze_C else dC,
                dD, dz, ddelta_bias, None, None)


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    """mamba-ssm's ``selective_scan_fn`` (same arguments, same results) on kotomamba's Triton kernels.

    u, delta, z: (batch, dim, seqlen); A: (dim, d_state) real float32; B, C: (batch, groups, d_state,
    seqlen) or (batch, d_state, seqlen); D, delta_bias: (dim,) float32. Returns out (batch, dim,
    seqlen) in u's dtype, and with ``return_last_state`` also the final state (batch, dim, d_state)
    float32, which gets no gradient.
    """
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# ----------------------------------------------------------------------------------------------
# mamba-ssm's compiled-extension interface, so that its own MambaInnerFn runs on these kernels


def handles(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> bool:
    """Whether this kernel covers the call: real A, input-dependent B and C (all Mamba-1 uses)."""
    return not A.is_complex() and B.dim() == 4 and C.dim() == 4


class SelectiveScanExtension(types.ModuleType):
    """Stands in for ``selective_scan_cuda`` (its ``fwd``/``bwd`` contract) with the Triton kernels.

    Calls this kernel does not cover (complex A, constant B/C) go to the real extension unchanged.
    With ``z``, ``fwd`` returns an empty tensor for the pre-gate output: mamba-ssm's callers only hand
    it back to ``bwd``, which recomputes it. The intermediate ``x`` is this kernel's chunk states, not
    the CUDA kernel's layout: callers must not slice it (kotomamba routes ``selective_scan_fn`` to
    :func:`selective_scan_fn`, whose final state comes from the states directly).
    """

    def __init__(self, extension: types.ModuleType | None):
        super().__init__("selective_scan_cuda")
        self.extension = extension

    def _fallback(self, name: str):
        if self.extension is None:
            raise SelectiveScanInputError(f"selective_scan_cuda.{name}: complex A or constant B/C need mamba-ssm's "
                                          f"CUDA extension, which is not installed")
        return getattr(self.extension, name)

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        if not handles(A, B, C):
            return self._fallback("fwd")(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        out, states, out_z = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, store_out=z is None)
        if z is None:
            return [out, states]
        return [u.new_empty(0), states, out_z]

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
        if not handles(A, B, C):
            return self._fallback("bwd")(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus,
                                         recompute_out_z)
        du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z = scan_backward(
            u, delta, A, B, C, D, z, delta_bias, dout, x, delta_softplus, dz=dz, recompute_out_z=recompute_out_z)
        result = [du, ddelta, dA, dB, dC, dD, ddelta_bias]
        if z is not None:
            result.append(dz)
            if recompute_out_z:
                result.append(out_z)
        return result
